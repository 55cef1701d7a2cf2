"""Public building blocks for backends: bpf(2) calls, namespace-aware worker threads, rtnetlink.

`bpf` and `codec` have no trio in them; `netns` runs sync calls in worker threads inside a namespace;
`netlink` is the trio rtnetlink transport built on them.
"""

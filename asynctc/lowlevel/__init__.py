"""Public building blocks for backends: bpf(2) calls, namespace-aware worker threads, rtnetlink, and the
legacy-tc policy.

`bpf` and `codec` have no trio in them, nor has `libbpf` (the system's libbpf.so.1 through ctypes, which
opens and loads compiled BPF objects for `asynctc.open_object`); `netns` runs sync calls in worker
threads inside a namespace;
`netlink` is the trio rtnetlink transport built on them. `tcpolicy` is pure (no trio, no kernel): the
priority rule for positions and the owner tag in filter names, shared by every backend that adds
cls_bpf filters.
"""

// SPDX-License-Identifier: GPL-2.0
/* blocklist.c: drop IPv4 packets from blocked source addresses on a tc ingress hook.
 *
 * User space (blocklist.py) writes the blocked addresses into `blocklist` while traffic flows; the program
 * counts what it dropped per address there, and every packet it saw in `stats` (per CPU: 0 let through,
 * 1 dropped). Packets it does not drop go on to the next program on the hook (TCX_NEXT), so it composes
 * with other tc programs.
 *
 *   clang -O2 -g -target bpf -I/usr/include/$(gcc -dumpmachine) -c blocklist.c -o blocklist.o
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define TCX_NEXT TC_ACT_UNSPEC	/* -1: let the next program decide (pass when there is none) */
#define TCX_DROP TC_ACT_SHOT	/* 2 */

enum { STAT_PASSED = 0, STAT_DROPPED = 1 };

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);	/* IPv4 source address, network byte order */
	__type(value, __u64);	/* packets dropped from it */
} blocklist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);	/* STAT_PASSED, STAT_DROPPED */
	__type(value, __u64);
} stats SEC(".maps");

SEC("tcx/ingress")
int blocklist_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	__u32 stat = STAT_PASSED;
	__u64 *n;

	if ((void *)(ip + 1) <= data_end && eth->h_proto == bpf_htons(ETH_P_IP)) {
		__u32 saddr = ip->saddr;

		n = bpf_map_lookup_elem(&blocklist, &saddr);
		if (n) {
			__sync_fetch_and_add(n, 1);
			stat = STAT_DROPPED;
		}
	}
	n = bpf_map_lookup_elem(&stats, &stat);
	if (n)
		*n += 1;	/* per-CPU: no other CPU writes this slot */
	return stat == STAT_DROPPED ? TCX_DROP : TCX_NEXT;
}

char LICENSE[] SEC("license") = "GPL";

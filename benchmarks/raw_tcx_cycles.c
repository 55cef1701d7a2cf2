/* The raw anchor of bench_tcx_rcu.py: N threads, each looping tcx BPF_LINK_CREATE + close() on its own
 * device (closing the only fd of an unpinned link detaches it), for a fixed time. No framework at all:
 * the kernel's own cost. Compiled with `cc -O2 -pthread` when the benchmark starts.
 *
 *   raw_tcx_cycles NETNS_PATH SECONDS DEV...     prints "CYCLES SECONDS"
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <net/if.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int prog_fd;
static volatile int go, stop;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static long sys_bpf(int cmd, union bpf_attr *a) { return syscall(__NR_bpf, cmd, a, sizeof(*a)); }
struct worker { pthread_t t; unsigned ifindex; long cycles; int err; };
static void *run(void *arg) {
    struct worker *w = arg;
    while (!go) sched_yield();
    while (!stop) {
        union bpf_attr a; memset(&a, 0, sizeof a);
        a.link_create.prog_fd = prog_fd; a.link_create.target_ifindex = w->ifindex;
        a.link_create.attach_type = 46;
        int fd = sys_bpf(BPF_LINK_CREATE, &a);
        if (fd < 0) { w->err = errno; return NULL; }
        close(fd);
        w->cycles++;
    }
    return NULL;
}
int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: raw NETNS_PATH SECONDS DEV...\n"); return 2; }
    int ns = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (ns < 0 || setns(ns, CLONE_NEWNET) != 0) { perror("setns"); return 1; }
    double secs = atof(argv[2]);
    int n = argc - 3;
    struct bpf_insn insns[2] = {{.code = 0xb7, .dst_reg = 0, .imm = 0}, {.code = 0x95}};
    union bpf_attr a; memset(&a, 0, sizeof a);
    a.prog_type = BPF_PROG_TYPE_SCHED_CLS; a.insn_cnt = 2; a.insns = (uintptr_t)insns;
    a.license = (uintptr_t)"GPL";
    prog_fd = sys_bpf(BPF_PROG_LOAD, &a);
    if (prog_fd < 0) { perror("prog_load"); return 1; }
    struct worker *w = calloc(n, sizeof *w);
    for (int i = 0; i < n; i++) {
        w[i].ifindex = if_nametoindex(argv[3 + i]);
        if (!w[i].ifindex) { fprintf(stderr, "no device %s\n", argv[3 + i]); return 1; }
        pthread_create(&w[i].t, NULL, run, &w[i]);
    }
    double t0 = now(); go = 1;
    while (now() - t0 < secs) usleep(2000);
    stop = 1;
    long total = 0; int err = 0;
    for (int i = 0; i < n; i++) { pthread_join(w[i].t, NULL); total += w[i].cycles; if (w[i].err) err = w[i].err; }
    double el = now() - t0;
    if (err) { fprintf(stderr, "link_create: %s\n", strerror(err)); return 1; }
    printf("%ld %.6f\n", total, el);
    return 0;
}

"""The stress harness: many concurrent attachment lifecycles, then a leak audit read from the kernel itself.

`stress(...)` runs N lifecycles over K devices (spread over M network namespaces, or M MockKernels) for a
while. Each lifecycle loops: attach a program to a random hook, update it a few times, sometimes pin and
unpin it, detach it; a random share of the lifecycles is cancelled at a random instant (mid-attach,
mid-update, mid-detach). Meanwhile devices are deleted and re-created (severing what was on them) and, on
the mock, kernel calls fail by injected faults. When the time is up every lifecycle is cancelled at once
(a cancellation storm), the sessions close, and the harness reads the kernel itself, never the sessions'
records: what is left on any hook (tcx entries, filters), any clsact qdisc, any BPF link still holding one
of the run's programs, any pin. Anything found is a leak.

On the real kernel the harness works in namespaces it creates (and removes) itself, with one veth pair per
device, and needs root; on the mock it needs nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as _errno
import math
import os
import random
import time
import types
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import trio

from asynctc import Op

from .._errors import BackendUnavailable, CleanupError, TCError
from .._program import Program
from .._session import Session, open_session
from .._types import Direction

__all__ = ["LatencyStats", "Leak", "StressReport", "stress"]

OPERATIONS = ("attach", "update", "detach")

# The MockKernel operations faults are injected into (the calls an attach, update, pin or detach makes),
# and the errnos they fail with.
FAULT_OPS = (
    "dev_get", "link_create", "link_update", "link_info", "link_detach", "qdisc_get", "qdisc_add",
    "qdisc_delete", "filter_dump", "filter_add", "filter_replace", "filter_delete", "obj_pin", "obj_unpin",
)
FAULT_ERRNOS = (_errno.EIO, _errno.ENOMEM, _errno.EBUSY)

MAX_PROGRAMS = 128  # each lifecycle swaps between two programs of a pool of at most this many
MAX_UPDATES = 3


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Latency of one operation kind over a run, in seconds (nearest-rank percentiles)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: Iterable[float]) -> LatencyStats:
        s = sorted(samples)
        if not s:
            return cls(0, 0.0, 0.0, 0.0, 0.0)

        def rank(p: float) -> float:
            return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]

        return cls(len(s), rank(50), rank(90), rank(99), s[-1])

    def to_json(self) -> dict[str, float | int]:
        """Counts, and milliseconds rounded to microseconds."""
        return {"count": self.count} | {k: round(getattr(self, k) * 1000, 3) for k in ("p50", "p90", "p99", "max")}


@dataclass(frozen=True, slots=True)
class Leak:
    """Something the audit found in the kernel after every session closed.

    Attributes:
        kind: "tcx" (a program on a tcx hook), "filter" (a tc filter), "qdisc" (a clsact or ingress qdisc),
            "link" (a BPF link that still holds one of the run's programs) or "pin" (a file on bpffs).
        where: the network namespace (real kernel) or "mock kernel N".
        dev: the device, where the leak is on one.
        direction: "ingress" or "egress", for hook entries and filters.
        detail: what exactly is there (ids, priority and handle...).
    """

    kind: str
    where: str
    dev: str | None
    direction: str | None
    detail: str

    def __str__(self) -> str:
        on = f" on {self.dev}" + (f" {self.direction}" if self.direction else "") if self.dev else ""
        return f"{self.kind} in {self.where}{on}: {self.detail}"


@dataclass(frozen=True, slots=True)
class StressReport:
    """What a stress run did and what it left behind. `leaks` is empty when the kernel is clean.

    Attributes:
        backend: the backend the sessions resolved to.
        kernel: "linux" (the real kernel) or "mock" (MockKernel).
        lifecycles, devices, namespaces, duration, seed, cancel_rate, fault_rate, delete_rate, pin_rate:
            the run's parameters (`seed` as drawn when none was given: pass it again to replay the choices).
        elapsed: seconds from the first lifecycle to the end of the audit.
        operations: completed operations by kind ("attach", "update", "detach", "pin", "unpin").
        cancelled: lifecycles cut short by a random cancellation (the final storm not counted).
        faults_injected: faults armed on the mock kernel.
        device_deletions: devices deleted (and re-created) during the run.
        errors: failed operations by exception type (expected under faults and device deletions).
        latency: LatencyStats for "attach", "update" and "detach".
        leaks: what the audit found.
    """

    backend: str
    kernel: str
    lifecycles: int
    devices: int
    namespaces: int
    duration: float
    seed: int
    cancel_rate: float
    fault_rate: float
    delete_rate: float
    pin_rate: float
    elapsed: float
    operations: Mapping[str, int]
    cancelled: int
    faults_injected: int
    device_deletions: int
    errors: Mapping[str, int]
    latency: Mapping[str, LatencyStats]
    leaks: tuple[Leak, ...]

    @property
    def leaked(self) -> bool:
        return bool(self.leaks)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data: `leaks` is the number of leaks, `leak_details` lists them."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "leaks":
                out["leaks"] = len(value)
                out["leak_details"] = [dataclasses.asdict(leak) for leak in value]
            elif f.name == "latency":
                out["latency_ms"] = {k: v.to_json() for k, v in value.items()}
            elif isinstance(value, Mapping):
                out[f.name] = dict(value)
            elif isinstance(value, float):
                out[f.name] = round(value, 6)
            else:
                out[f.name] = value
        return out

    def summary(self) -> str:
        """A few lines for people."""
        ops = ", ".join(f"{self.operations.get(k, 0)} {k}" for k in (*OPERATIONS, "pin"))
        lines = [
            f"{self.backend} backend ({self.kernel} kernel): {self.lifecycles} lifecycles over {self.devices} "
            f"device(s) in {self.namespaces} namespace(s) for {self.duration:g} s (seed {self.seed})",
            f"operations: {ops}; {self.cancelled} cancelled mid-lifecycle, {self.device_deletions} device "
            f"deletion(s), {self.faults_injected} injected fault(s)",
        ]
        if self.errors:
            lines.append("failed operations: " + ", ".join(f"{n} {k}" for k, n in sorted(self.errors.items())))
        lines.append(f"{'latency (ms)':<12} {'count':>7} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9}")
        for op in OPERATIONS:
            st = self.latency[op]
            lines.append(f"{op:<12} {st.count:>7} " + " ".join(f"{getattr(st, k) * 1000:>9.3f}"
                                                           for k in ("p50", "p90", "p99", "max")))
        lines.append(f"leaks: {len(self.leaks)}")
        lines.extend(f"  {leak}" for leak in self.leaks)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# environments: one per namespace (real kernel) or per MockKernel


@dataclass(eq=False)
class _Env:
    index: int
    where: str
    devices: list[str]
    netns: str | None = None  # real kernel
    kernel: Any = None  # MockKernel
    programs: list[Program] = dataclasses.field(default_factory=list)
    session: Session | None = None
    pin_dir: str | None = None

    def peer(self, dev: str) -> str:
        return dev + "p"


@dataclass(frozen=True)
class _Config:
    backend: str
    lifecycles: int
    devices: int
    namespaces: int
    duration: float
    cancel_rate: float
    fault_rate: float
    delete_rate: float
    pin_rate: float
    seed: int
    owner: str


def _check_rate(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value <= 1):
        raise ValueError(f"{name} must be a probability between 0 and 1, got {value!r}")
    return float(value)


def _check_number(name: str, value: float, what: str, *, positive: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} {what}, got {value!r}")
    return float(value)


def _check_count(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (low <= value <= high):
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


class _Run:
    """One stress run: the workload, its counters, and the audit."""

    def __init__(self, cfg: _Config, kind: str, progress: TextIO | None) -> None:
        self.cfg = cfg
        self.kind = kind  # "linux" or "mock"
        self.progress = progress
        self.rng = random.Random(cfg.seed)
        self.envs: list[_Env] = []
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.samples: dict[str, list[float]] = {op: [] for op in OPERATIONS}
        self.cancelled = 0
        self.faults = 0
        self.deletions = 0
        self.typical = 0.005  # running estimate of one lifecycle's length: scales the random cancellations
        self.unpin_later: list[Any] = []
        self.prog_ids: set[int] = set()
        self.backend_name = cfg.backend

    # -- counters -----------------------------------------------------------------------------------------
    def _record(self, op: str, started: float) -> None:
        self.ops[op] += 1
        if op in self.samples:
            self.samples[op].append(time.perf_counter() - started)

    def failed(self, exc: BaseException) -> None:
        self.errors[type(exc).__name__] += 1

    def _maybe_fault(self, rng: random.Random, env: _Env) -> None:
        if env.kernel is not None and self.cfg.fault_rate and rng.random() < self.cfg.fault_rate:
            env.kernel.inject_fault(rng.choice(FAULT_OPS), rng.choice(FAULT_ERRNOS))
            self.faults += 1

    # -- the workload -------------------------------------------------------------------------------------
    async def lifecycle(self, index: int) -> None:
        rng = random.Random(self.cfg.seed * 1_000_003 + index)
        while True:
            env = rng.choice(self.envs)
            dev = rng.choice(env.devices)
            direction = rng.choice((Direction.INGRESS, Direction.EGRESS))
            with trio.CancelScope() as scope:
                if rng.random() < self.cfg.cancel_rate:
                    scope.deadline = trio.current_time() + rng.uniform(0, 1.5 * self.typical)
                started = time.perf_counter()
                await self._one(index, rng, env, dev, direction)
                self.typical = 0.9 * self.typical + 0.1 * (time.perf_counter() - started)
            if scope.cancelled_caught:
                self.cancelled += 1
            await trio.lowlevel.checkpoint()

    async def _one(self, index: int, rng: random.Random, env: _Env, dev: str, direction: Direction) -> None:
        assert env.session is not None
        # Each lifecycle has its own two programs (while the pool lasts): a tcx hook takes a program only
        # once, so shared programs would mostly measure AlreadyAttached.
        mine = [env.programs[(2 * index + j) % len(env.programs)] for j in (0, 1)]
        current = rng.choice(mine)
        options: dict[str, Any] = {}
        if self.kind == "mock" and env.session.backend_name == "mock":
            options["mode"] = rng.choice(("tcx", "legacy"))
        self._maybe_fault(rng, env)
        started = time.perf_counter()
        try:
            async with env.session.open_attachment(dev, direction, current, **options) as att:
                self._record("attach", started)
                for _ in range(rng.randint(0, MAX_UPDATES)):
                    new = mine[1] if current is mine[0] else mine[0]
                    self._maybe_fault(rng, env)
                    started = time.perf_counter()
                    await att.update(new, expected=current if rng.random() < 0.5 else None)
                    self._record("update", started)
                    current = new
                if env.pin_dir is not None and rng.random() < self.cfg.pin_rate:
                    await self._pinned_for_a_moment(rng, env, att)
                self._maybe_fault(rng, env)
                started = time.perf_counter()
                await att.detach()
                self._record("detach", started)
        except (TCError, CleanupError) as exc:
            # Expected under faults and device deletions; whatever it left is the audit's to find.
            self.failed(exc)

    async def _pinned_for_a_moment(self, rng: random.Random, env: _Env, att: Any) -> None:
        assert env.pin_dir is not None
        self._maybe_fault(rng, env)
        await att.pin(os.path.join(env.pin_dir, uuid.uuid4().hex[:12]))
        self.ops["pin"] += 1
        try:
            await trio.lowlevel.checkpoint()  # a cancellation may land while it is pinned
        finally:
            # A pinned attachment outlives its scope: an application unpins it before letting go.
            with trio.CancelScope(shield=True):
                try:
                    await att.unpin()
                    self.ops["unpin"] += 1
                except TCError as exc:
                    self.failed(exc)
                    self.unpin_later.append(att)

    async def chaos(self) -> None:
        """Delete a random device now and then (severing what is on it), and re-create it at once."""
        if not self.cfg.delete_rate:
            return
        rng = random.Random(self.cfg.seed ^ 0x5EED)
        while True:
            await trio.sleep(rng.expovariate(self.cfg.delete_rate))
            env = rng.choice(self.envs)
            dev = rng.choice(env.devices)
            with trio.CancelScope(shield=True):  # never leave a device missing
                await trio.to_thread.run_sync(self._recreate, env, dev)
            self.deletions += 1

    def _recreate(self, env: _Env, dev: str) -> None:
        if env.kernel is not None:
            env.kernel.remove_device(dev)
            env.kernel.add_device(dev)
            return
        from ._netenv import ip, veth_pair

        assert env.netns is not None
        ip("link", "del", dev, netns=env.netns)
        veth_pair(env.netns, dev, env.netns, env.peer(dev))

    async def show_progress(self, started: float) -> None:
        assert self.progress is not None
        try:
            while True:
                await trio.sleep(0.25)
                attached = sum(len(e.session.attachments) for e in self.envs if e.session is not None)
                elapsed = trio.current_time() - started
                self.progress.write(
                    f"\r{elapsed:6.1f}/{self.cfg.duration:g} s  attach {self.ops['attach']}  update "
                    f"{self.ops['update']}  detach {self.ops['detach']}  cancelled {self.cancelled}  "
                    f"errors {sum(self.errors.values())}  deleted {self.deletions}  attached now {attached}  "
                )
                self.progress.flush()
        finally:
            self.progress.write("\n")
            self.progress.flush()

    async def finish(self) -> None:
        """After the storm: stop injecting faults, then unpin what a failed unpin left pinned (as an
        application would on its way out) so that the sessions can detach it."""
        for env in self.envs:
            if env.kernel is not None:
                env.kernel.clear_faults()
        for att in self.unpin_later:
            if att.info.pinned:
                try:
                    await att.unpin()
                except TCError as exc:
                    self.failed(exc)

    # -- the audit ----------------------------------------------------------------------------------------
    async def audit(self) -> list[Leak]:
        leaks: list[Leak] = []
        for env in self.envs:
            if env.kernel is not None:
                leaks.extend(await trio.to_thread.run_sync(_audit_mock, env))
            else:
                leaks.extend(await _audit_netns(env))
        if self.kind == "linux":
            leaks.extend(await trio.to_thread.run_sync(_audit_links, frozenset(self.prog_ids)))
        for env in self.envs:
            if env.kernel is None and env.pin_dir is not None:
                leaks.extend(await trio.to_thread.run_sync(_audit_pins, env))
        return leaks


def _audit_mock(env: _Env) -> list[Leak]:
    """Read the MockKernel's own state: hooks, filters, qdiscs, links and pins."""
    k = env.kernel
    leaks: list[Leak] = []
    for dev in k.devices():
        for d in Direction:
            for e in k.hook(dev, d).entries:
                leaks.append(Leak("tcx", env.where, dev, d.value, f"prog {e.prog_id} link {e.link_id}"))
            for f in k.filters(dev, d):
                leaks.append(Leak("filter", env.where, dev, d.value,
                                  f"{f.kind} pref {f.priority} handle {f.handle:#x} prog {f.prog_id} name {f.name!r}"))
        q = k.qdisc(dev)
        if q is not None:
            leaks.append(Leak("qdisc", env.where, dev, None, f"{q.kind} created by {q.creator}"))
    for li in k.links():
        leaks.append(Leak("link", env.where, None, None,
                          f"link {li.link_id} prog {li.prog_id} ifindex {li.ifindex} pins {list(li.pinned)}"))
    for path, what in k.pins().items():
        leaks.append(Leak("pin", env.where, None, None, f"{path} ({what})"))
    return leaks


async def _audit_netns(env: _Env) -> list[Leak]:
    """Raw queries in a namespace: every device's tcx hooks (BPF_PROG_QUERY), its filters and qdiscs (rtnetlink
    dumps). The namespace is the run's own, so anything there was left by the run."""
    from ..lowlevel import bpf, codec
    from ..lowlevel.hook import ATTACH_TYPES, dump_filters
    from ..lowlevel.netlink import open_transport
    from ..lowlevel.netns import NetnsRunner

    leaks: list[Leak] = []
    runner = NetnsRunner(env.netns, trio.CapacityLimiter(2))
    try:
        async with open_transport(runner) as nl:
            msgs = await nl.dump(lambda seq: codec.encode_dump_request(seq, codec.RTM_GETLINK), op=Op.LINK_DUMP)
            names = {m.ifindex: m.name or str(m.ifindex) for m in msgs if isinstance(m, codec.LinkMsg)}
            for ifindex, name in sorted(names.items()):
                for d in Direction:
                    try:
                        q = await runner.run(bpf.prog_query, ifindex, ATTACH_TYPES[d])
                    except bpf.BpfError as exc:
                        if exc.errno != _errno.EINVAL:  # EINVAL: a kernel without tcx
                            raise
                    else:
                        for prog_id, link_id in zip(q.prog_ids, q.link_ids, strict=True):
                            leaks.append(Leak("tcx", env.where, name, d.value, f"prog {prog_id} link {link_id}"))
                    for f in await dump_filters(nl, ifindex, d, dev=name):
                        leaks.append(Leak("filter", env.where, name, d.value,
                                          f"{f.kind} pref {f.priority} handle {f.handle:#x} prog {f.bpf_id} "
                                          f"name {f.bpf_name!r}"))
            qdiscs = await nl.dump(lambda seq: codec.encode_dump_request(seq, codec.RTM_GETQDISC), op=Op.QDISC_DUMP)
            for m in qdiscs:
                if isinstance(m, codec.QdiscMsg) and m.kind in ("clsact", "ingress"):
                    leaks.append(Leak("qdisc", env.where, names.get(m.ifindex, str(m.ifindex)), None, m.kind))
    finally:
        runner.close()
    return leaks


def _audit_links(prog_ids: frozenset[int]) -> list[Leak]:
    """Every BPF link in the system that holds one of the run's programs (attached or not: a link fd
    that was never closed is a leak too)."""
    from ..lowlevel import bpf

    leaks = []
    for link_id in bpf.link_ids():
        try:
            fd = bpf.link_get_fd_by_id(link_id)
        except bpf.BpfError:
            continue  # gone meanwhile
        try:
            info = bpf.link_info(fd)
        finally:
            os.close(fd)
        if info.prog_id in prog_ids:
            leaks.append(Leak("link", "the system", None, None,
                              f"link {link_id} prog {info.prog_id} ifindex {info.ifindex or 'none (detached)'}"))
    return leaks


def _audit_pins(env: _Env) -> list[Leak]:
    assert env.pin_dir is not None
    return [Leak("pin", env.where, None, None, os.path.join(root, name))
            for root, dirs, files in os.walk(env.pin_dir) for name in (*dirs, *files)]


# ---------------------------------------------------------------------------------------------------------
# setting up and removing the environments


def _kernel_kind(backend: str, plugins: Iterable[object] | None) -> str:
    if backend == "auto":
        return "linux"
    from .. import _plugins

    pm = _plugins.make_plugin_manager(plugins=plugins) if plugins else _plugins.get_plugin_manager()
    return _plugins.collect_backends(pm).get(backend).kernel_kind


def _load_programs(count: int) -> list[Program]:
    from .. import programs

    loaded: list[Program] = []
    try:
        for j in range(count):
            loaded.append(programs.constant("pass", name=f"stress{j}"))
    except BaseException:
        for p in loaded:
            p.close()
        raise
    return loaded


def _make_netns(env: _Env) -> None:
    from ._netenv import create_netns, unique_name, veth_pair

    env.netns = create_netns(unique_name("atcst"))
    env.where = f"namespace {env.netns}"
    for dev in env.devices:
        veth_pair(env.netns, dev, env.netns, env.peer(dev))


@contextlib.asynccontextmanager
async def _environments(run: _Run, plugins: Iterable[object] | None) -> AsyncIterator[None]:
    cfg = run.cfg
    names = [f"st{i}" for i in range(cfg.devices)]
    groups = [names[i::cfg.namespaces] for i in range(cfg.namespaces)]
    run.envs = [_Env(i, f"mock kernel {i}", g) for i, g in enumerate(groups)]
    mounts: list[contextlib.AbstractContextManager[str]] = []
    pool = min(2 * cfg.lifecycles, MAX_PROGRAMS)
    try:
        with trio.CancelScope(shield=True):  # half-made environments are still removed
            if run.kind == "mock":
                from asynctc_mock import MockKernel

                for env in run.envs:
                    env.kernel = MockKernel(devices=("lo", *env.devices))
                    env.programs = [env.kernel.program("pass", name=f"stress{j}") for j in range(pool)]
                    if cfg.pin_rate:
                        env.pin_dir = f"/sys/fs/bpf/asynctc-stress-{env.index}"
            else:
                from ._netenv import bpffs_mount, kernel_test_skip_reason

                why = await trio.to_thread.run_sync(kernel_test_skip_reason)
                if why:
                    raise BackendUnavailable(f"stress on the real kernel is not possible here: {why}; "
                                             "use the mock backend (backend='mock')")
                progs = await trio.to_thread.run_sync(_load_programs, pool)
                run.prog_ids.update(p.id for p in progs)
                for env in run.envs:
                    env.programs = progs
                    await trio.to_thread.run_sync(_make_netns, env)
                    if cfg.pin_rate:
                        mounts.append(bpffs_mount())
                        root = await trio.to_thread.run_sync(mounts[-1].__enter__)
                        # pins go to a directory of their own: a fresh bpffs already holds the kernel's
                        # progs.debug and maps.debug
                        env.pin_dir = os.path.join(root, "stress")
                        await trio.to_thread.run_sync(os.mkdir, env.pin_dir, 0o700)
        yield
    finally:
        with trio.CancelScope(shield=True):
            for mount in reversed(mounts):
                await trio.to_thread.run_sync(mount.__exit__, None, None, None)
            seen: set[int] = set()
            for env in run.envs:
                if env.netns is not None:
                    from ._netenv import delete_netns

                    await trio.to_thread.run_sync(delete_netns, env.netns)
                for p in env.programs:
                    if id(p) not in seen:
                        seen.add(id(p))
                        p.close()
                if env.kernel is not None:
                    env.kernel.close()


@contextlib.asynccontextmanager
async def _sessions(run: _Run, plugins: Iterable[object] | None) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for env in run.envs:
            env.session = await stack.enter_async_context(_one_session(run, env, plugins))
        run.backend_name = run.envs[0].session.backend_name if run.envs[0].session else run.cfg.backend
        yield


@contextlib.asynccontextmanager
async def _one_session(run: _Run, env: _Env, plugins: Iterable[object] | None) -> AsyncIterator[Session]:
    try:
        async with open_session(run.cfg.backend, netns=env.netns, owner=run.cfg.owner, kernel=env.kernel,
                                plugins=plugins) as session:
            yield session
    except CleanupError as exc:  # the session could not detach something: the audit says what is left
        run.failed(exc)
    finally:
        env.session = None


async def stress(
    *,
    lifecycles: int = 16,
    devices: int = 4,
    duration: float = 5.0,
    namespaces: int = 1,
    backend: str = "auto",
    cancel_rate: float = 0.2,
    fault_rate: float = 0.0,
    delete_rate: float = 1.0,
    pin_rate: float = 0.1,
    seed: int | None = None,
    plugins: Iterable[object] | None = None,
    owner: str = "asynctc-stress",
    progress: TextIO | None = None,
) -> StressReport:
    """Run many concurrent attachment lifecycles, then audit the kernel for anything left behind.

    Args:
        lifecycles: how many lifecycles run at once (each loops attach, updates, pin, detach).
        devices: how many devices they share (veth pairs, or MockKernel devices), spread over `namespaces`.
        duration: seconds of workload; then every lifecycle is cancelled at once.
        namespaces: how many network namespaces (on the mock: MockKernels), each with its own session.
        backend: "auto", "bpf_link" or "netlink" (the real kernel, in namespaces the run creates and
            removes; needs root), "mock", or a third-party backend's name.
        cancel_rate: the share of lifecycles cancelled at a random instant.
        fault_rate: the chance that an operation is preceded by an injected fault on a random kernel call
            (mock only). Faults stop before the sessions close, so any leak is the code's, not the fault's.
        delete_rate: device deletions (each re-created at once) per second.
        pin_rate: the share of lifecycles that pin their attachment (on a private bpffs) and unpin it.
        seed: makes the random choices repeatable (the report says which was used).
        plugins: extra plugin objects for the sessions (e.g. a third-party backend to stress).
        owner: the sessions' owner tag.
        progress: a stream for a live progress line (e.g. sys.stderr when it is a terminal); None: quiet.

    Returns:
        A frozen StressReport; `report.leaks` lists what the audit found (empty when nothing leaked).

    Raises:
        ValueError: a parameter is out of range (fault injection asked of a real kernel...).
        BackendUnavailable: the backend is not installed, or the real kernel is not usable here.
    """
    if not isinstance(backend, str) or not backend:
        raise TypeError(f"backend must be a backend name, got {backend!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    cfg = _Config(
        backend=backend,
        lifecycles=_check_count("lifecycles", lifecycles, 1, 100_000),
        devices=_check_count("devices", devices, 1, 4096),
        namespaces=_check_count("namespaces", namespaces, 1, 256),
        duration=_check_number("duration", duration, "must be a positive number of seconds", positive=True),
        cancel_rate=_check_rate("cancel_rate", cancel_rate),
        fault_rate=_check_rate("fault_rate", fault_rate),
        delete_rate=_check_number("delete_rate", delete_rate, "must be >= 0 deletions per second", positive=False),
        pin_rate=_check_rate("pin_rate", pin_rate),
        seed=random.randrange(2**32) if seed is None else seed,
        owner=owner,
    )
    if namespaces > devices:
        raise ValueError(f"namespaces ({namespaces}) cannot exceed devices ({devices}): each namespace needs "
                         "a device")
    plugins = list(plugins) if plugins is not None else None
    kind = await trio.to_thread.run_sync(_kernel_kind, backend, plugins)
    if kind != "mock" and cfg.fault_rate:
        raise ValueError(f"fault injection needs the mock kernel; backend {backend!r} drives the real kernel: "
                         "leave fault_rate at 0 or use backend='mock'")
    run = _Run(cfg, kind, progress)
    started = trio.current_time()
    async with _environments(run, plugins):
        async with _sessions(run, plugins):
            with trio.move_on_after(cfg.duration):
                async with trio.open_nursery() as nursery:
                    if progress is not None:
                        nursery.start_soon(run.show_progress, started)
                    nursery.start_soon(run.chaos)
                    for i in range(cfg.lifecycles):
                        nursery.start_soon(run.lifecycle, i)
            with trio.CancelScope(shield=True):
                await run.finish()
        with trio.CancelScope(shield=True):
            leaks = await run.audit()
    return StressReport(
        backend=run.backend_name, kernel=kind, lifecycles=cfg.lifecycles, devices=cfg.devices,
        namespaces=cfg.namespaces, duration=cfg.duration, seed=cfg.seed, cancel_rate=cfg.cancel_rate,
        fault_rate=cfg.fault_rate, delete_rate=cfg.delete_rate, pin_rate=cfg.pin_rate,
        elapsed=trio.current_time() - started,
        operations=types.MappingProxyType(dict(run.ops)), cancelled=run.cancelled,
        faults_injected=run.faults, device_deletions=run.deletions,
        errors=types.MappingProxyType(dict(run.errors)),
        latency=types.MappingProxyType({op: LatencyStats.of(run.samples[op]) for op in OPERATIONS}),
        leaks=tuple(leaks),
    )

"""A backend written from scratch: tc hooks of an in-memory "dummy" network.

`DummyNet` plays the kernel: devices, the programs on each hook in run order (as links with ids), and a
table of pins. It fails as a kernel does, with `OSError(errno)`. `DummyBackend` implements the asynctc
Backend contract on it and translates each OSError once, at its edge, with `asynctc.from_errno`.

What it can do, and what it says it cannot:
- attach at First/Last/Before/After, update (with compare-and-swap), detach, query, pin and adopt;
- no revisions (`has_revisions = False`), no hardware offload, no attach options;
- no orphans: everything it makes is detached by its session or pinned on purpose (`reap_orphans` is the
  base class's, which removes nothing);
- no event source: the base class's `open_event_source` raises BackendUnavailable, so the session polls
  `is_attached` to notice severing, and monitors deliver only AttachmentSevered events.

Its kernel is in memory, so it is of `kernel_kind = "mock"`: a session asks for it by name and passes the
network as `kernel=` (or gets a fresh one from `new_kernel()`). With no `kernel_type`, it could be offered
any in-memory kernel, so its probe refuses all but a DummyNet. Its calls never block, so they run on the
trio thread; a backend of the real kernel makes each call on `self.ctx.kernel` and runs each blocking one
with `await self.ctx.runner.run(...)`.

    net = DummyNet()
    async with asynctc.open_session("dummy", kernel=net, plugins=[DummyPlugin()]) as session:
        await session.attach("dummy0", "ingress", net.program())
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import asynctc
from asynctc import AttachmentInfo, Direction, Hook, HookEntry, NotOwned, Op, Probe, Program, from_errno
from asynctc.backend import AttachRequest, Backend, BackendAttachment, BackendContext, Updated
from asynctc.lowlevel.bpf import BPF_PROG_TYPE_SCHED_CLS

__all__ = ["DummyAttachment", "DummyBackend", "DummyNet", "DummyPlugin", "DummyProgram"]


class DummyProgram(Program):
    """A SCHED_CLS program that exists only as an id (no fd): all the dummy network needs of one."""

    __slots__ = ("_closed",)

    def __init__(self, *, id: int, name: str) -> None:
        super().__init__(None, id=id, name=name, tag=f"{id:016x}", type=BPF_PROG_TYPE_SCHED_CLS)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def fd(self) -> int:
        raise asynctc.ProgramError(f"{self} exists only in a DummyNet (it has no fd): use the dummy backend")

    def close(self) -> None:
        self._closed = True


@dataclass
class Link:
    """One program on a hook of the dummy network."""

    link_id: int
    program: Program


class DummyNet:
    """The dummy backend's kernel: devices, each hook's links in run order, and pins (path -> link id).

    A link on a deleted device is severed: it is on no hook any more, and a pin naming it names nothing.
    """

    def __init__(self, devices: Iterable[str] = ("lo", "dummy0", "dummy1")) -> None:
        self.devices: dict[int, str] = {}
        self.hooks: dict[tuple[int, Direction], list[Link]] = {}
        self.pins: dict[str, int] = {}
        self.pin_owners: dict[str, str] = {}  # path -> the owner tag of the session that pinned it
        self._ifindexes = itertools.count(1)
        self._ids = itertools.count(1)
        for name in devices:
            self.add_device(name)

    def program(self, verdict: str = "pass") -> DummyProgram:
        """A new program (each call another id). The dummy network runs no packets: `verdict` only names it."""
        return DummyProgram(id=next(self._ids), name=f"dummy_{verdict}")

    def add_device(self, name: str) -> int:
        if name in self.devices.values():
            raise OSError(errno.EEXIST, f"device {name} exists")
        ifindex = next(self._ifindexes)
        self.devices[ifindex] = name
        return ifindex

    def remove_device(self, name: str) -> None:
        """Delete a device: the links on its hooks are severed."""
        ifindex = self.ifindex(name)
        del self.devices[ifindex]
        for direction in Direction:
            self.hooks.pop((ifindex, direction), None)

    def ifindex(self, dev: str | int) -> int:
        if isinstance(dev, int) and dev in self.devices:
            return dev
        for ifindex, name in self.devices.items():
            if name == dev:
                return ifindex
        raise OSError(errno.ENODEV, f"no device {dev!r}")

    def find(self, link_id: int) -> tuple[int, Direction, Link] | None:
        """Where link `link_id` is; None once it is severed or detached."""
        for (ifindex, direction), links in self.hooks.items():
            for link in links:
                if link.link_id == link_id:
                    return ifindex, direction, link
        return None

    def link_create(self, ifindex: int, direction: Direction, program: Program, where: str,
                    anchor_prog: int | None, anchor_link: int | None) -> Link:
        if ifindex not in self.devices:
            raise OSError(errno.ENODEV, f"no device with ifindex {ifindex}")
        links = self.hooks.setdefault((ifindex, direction), [])
        if any(link.program.id == program.id for link in links):
            raise OSError(errno.EEXIST, "the program is on this hook already")
        if where == "first":
            at = 0
        elif where == "last":
            at = len(links)
        else:
            found = [i for i, link in enumerate(links)
                     if link.link_id == anchor_link or (anchor_link is None and link.program.id == anchor_prog)]
            if not found:
                raise OSError(errno.ENOENT, "the anchor is not on this hook")
            at = found[0] + (1 if where == "after" else 0)
        link = Link(next(self._ids), program)
        links.insert(at, link)
        return link

    def link_detach(self, link_id: int) -> bool:
        """Take the link off its hook; False if it was not on one (severed, or detached already)."""
        found = self.find(link_id)
        if found is None:
            return False
        ifindex, direction, link = found
        self.hooks[(ifindex, direction)].remove(link)
        return True

    def link_update(self, link_id: int, program: Program, expected_prog_id: int | None) -> None:
        found = self.find(link_id)
        if found is None:
            raise OSError(errno.ENOLINK, "the link was severed")
        ifindex, direction, link = found
        if expected_prog_id is not None and link.program.id != expected_prog_id:
            raise OSError(errno.EPERM, f"program {link.program.id} is on the link, not {expected_prog_id}")
        if any(other.program.id == program.id for other in self.hooks[(ifindex, direction)] if other is not link):
            raise OSError(errno.EEXIST, "the program is on this hook already")
        link.program = program

    def pin(self, link_id: int, path: str, owner: str) -> None:
        if not path.startswith("/") or path.endswith("/"):
            raise OSError(errno.EINVAL, f"{path!r} is not an absolute file path")
        if path in self.pins:
            raise OSError(errno.EEXIST, f"{path} is taken")
        self.pins[path] = link_id
        self.pin_owners[path] = owner

    def unpin(self, path: str) -> None:
        self.pins.pop(path, None)
        self.pin_owners.pop(path, None)


class DummyAttachment(BackendAttachment):
    """The dummy backend's record of one attachment: its link. `info` says where it is."""

    def __init__(self, info: AttachmentInfo, link_id: int) -> None:
        super().__init__(info)
        self.link_id = link_id


class DummyBackend(Backend[DummyAttachment]):
    """The asynctc Backend contract on a DummyNet."""

    name = "dummy"
    kernel_kind = "mock"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        if not isinstance(ctx.kernel, DummyNet):
            raise TypeError(f"the dummy backend needs a DummyNet as kernel=, got {ctx.kernel!r}")
        self.net: DummyNet = ctx.kernel

    @classmethod
    def new_kernel(cls) -> DummyNet:
        return DummyNet()

    @classmethod
    async def probe(cls, ctx: BackendContext) -> Probe:
        if not isinstance(ctx.kernel, DummyNet):
            return Probe(False, f"the session's kernel is a {type(ctx.kernel).__name__}, not a DummyNet")
        return Probe(True, "in-memory dummy network; no privileges needed")

    def _info(self, dev: str, ifindex: int, direction: Direction, link: Link, pinned: str | None) -> AttachmentInfo:
        return AttachmentInfo(backend=self.name, netns=self.ctx.netns, dev=dev, ifindex=ifindex, direction=direction,
                              prog_id=link.program.id, link_id=link.link_id, handle=None, priority=None,
                              offloaded=False, pinned=pinned)

    async def resolve_device(self, dev: str | int) -> tuple[int, str]:
        try:
            ifindex = self.net.ifindex(dev)
        except OSError as exc:
            raise from_errno(exc.errno or 0, op=Op.DEV_GET, backend=self.name, dev=dev) from None
        return ifindex, self.net.devices[ifindex]

    async def attach(self, request: AttachRequest) -> DummyAttachment:
        p = request.placement
        try:
            link = self.net.link_create(request.ifindex, request.direction, request.program, p.where,
                                        p.prog_id, p.link_id)
        except OSError as exc:
            raise from_errno(exc.errno or 0, op=Op.LINK_CREATE, backend=self.name, dev=request.dev,
                             direction=request.direction, program=request.program, detail=exc.strerror) from None
        info = self._info(request.dev, request.ifindex, request.direction, link, pinned=None)
        return DummyAttachment(info, link.link_id)

    async def detach(self, att: DummyAttachment) -> bool:
        if att.info.pinned is not None:
            self.net.unpin(att.info.pinned)
        return self.net.link_detach(att.link_id)

    async def update(self, att: DummyAttachment, program: Program, *, expected: Program | None) -> Updated:
        op = "link_update" if expected is None else "link_update_cas"
        try:
            self.net.link_update(att.link_id, program, None if expected is None else expected.id)
        except OSError as exc:
            raise from_errno(exc.errno or 0, op=op, backend=self.name, dev=att.info.dev,
                             direction=att.info.direction, program=program, detail=exc.strerror) from None
        return Updated(method="link_update", revision=None, prog_id=program.id)

    async def is_attached(self, att: DummyAttachment) -> bool:
        return self.net.find(att.link_id) is not None

    async def query(self, ifindex: int, direction: Direction) -> Hook:
        links = self.net.hooks.get((ifindex, direction), [])
        entries = tuple(HookEntry(prog_id=link.program.id, prog_name=link.program.name, prog_tag=link.program.tag,
                                  kind="tcx", link_id=link.link_id, handle=None, priority=None, owned=False)
                        for link in links)
        return Hook(revision=None, entries=entries)

    async def pin(self, att: DummyAttachment, path: str) -> None:
        try:
            self.net.pin(att.link_id, path, self.ctx.owner)
        except OSError as exc:
            raise from_errno(exc.errno or 0, op=Op.OBJ_PIN, backend=self.name, dev=att.info.dev,
                             detail=exc.strerror) from None

    async def unpin(self, att: DummyAttachment) -> None:
        if att.info.pinned is not None:
            self.net.unpin(att.info.pinned)

    async def adopt_pinned(self, path: str, *, foreign: bool = False) -> DummyAttachment | None:
        link_id = self.net.pins.get(path)
        if link_id is None:
            return None  # nothing of ours is pinned there: the session asks its other backends
        owner = self.net.pin_owners.get(path)
        if not foreign and owner != self.ctx.owner:  # ownership is proven by the backend's own record
            raise NotOwned(f"the attachment pinned at {path} belongs to owner {owner!r}, not {self.ctx.owner!r}")
        found = self.net.find(link_id)
        if found is None:
            self.net.unpin(path)
            raise from_errno(errno.ENOLINK, op=Op.OBJ_GET, backend=self.name, dev=path,
                             detail="the pinned link was severed; its pin was removed")
        ifindex, direction, link = found
        return DummyAttachment(self._info(self.net.devices[ifindex], ifindex, direction, link, pinned=path), link_id)


class DummyPlugin:
    """Registers the dummy backend: pass it to `open_session(plugins=[...])`, or name its module in an
    entry point of the group "asynctc" with a module-level hook implementation like this one."""

    @asynctc.hookimpl
    def asynctc_register_backends(self, registry: asynctc.BackendRegistry) -> None:
        registry.add(DummyBackend)

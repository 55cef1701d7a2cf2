"""The bpf_link backend: tcx links (BPF_LINK_CREATE, Linux >= 6.6).

Ownership is an fd: the session holds each link's fd, closing it (or the process dying) detaches the
link, and netlink cannot delete it. Pinning a link to bpffs keeps it past the process; `adopt_pinned`
takes it over again. The kernel severs links when their device goes away (link info then shows
ifindex 0).

Updates are in place (BPF_LINK_UPDATE, atomic, BPF_F_REPLACE for compare-and-swap). When the kernel refuses
an in-place update, the backend falls back to make-before-break: the new program is linked right before
the old link (anchored to it, with the hook's revision checked), then the old link is detached, so the
hook is never without a program; any failure rolls back to the old program.

tcx has no hardware path: offload="require" raises OffloadError naming the netlink backend, and "prefer"
attaches in software (info.offloaded False).

Every kernel call that can block runs in the session's syscall threads (`asynctc.lowlevel.syscalls`); a
device lookup cannot (SIOCGIFINDEX / SIOCGIFNAME on a socket of the session's namespace, opened with the
backend: `Kernel.open_device_names`) and is made on the trio thread. A cycle makes the calls it needs and no
more, in two thread round trips: resolve_device = the ioctls, on the trio thread; attach = BPF_LINK_CREATE +
one link info read (the link id; for tcx it can only be read through BPF_OBJ_GET_INFO_BY_FD, which takes
rtnl); detach = one SIOCGIFNAME in the thread (the device still there under its ifindex and name: the
link was not severed; only if it is not, a link info read decides, as a severed link has ifindex 0:
detach() then returns False, and BPF_LINK_DETACH could not tell) + BPF_LINK_DETACH (closing our fd detaches
only if nobody else holds the link: a pin, a forked child, a tool holding it by id) + close().
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import logging
import struct
from contextlib import AbstractAsyncContextManager
from typing import ClassVar

import trio

import asynctc
from asynctc import (
    AttachmentInfo,
    Conflict,
    DeviceNotFound,
    Direction,
    Hook,
    NotOwned,
    Op,
    PinError,
    Probe,
    Program,
    Severed,
    TCError,
    from_errno,
    translated,
)
from asynctc.backend import AttachRequest, Backend, BackendAttachment, BackendContext, EventSource, Updated, atomic
from asynctc.lowlevel import bpf
from asynctc.lowlevel import hook as hooklib
from asynctc.lowlevel import transport as nllib
from asynctc.lowlevel.kernel import LINUX, BoundDeviceNames, DeviceNames, Kernel
from asynctc.lowlevel.netdev import resolve_device as resolve_device_here
from asynctc.lowlevel.syscalls import SyscallThreads
from asynctc.lowlevel.tcpolicy import parse_session_tag

__all__ = [
    "RECORD_SUFFIX",
    "BpfLinkBackend",
    "LinkAttachment",
    "LinkRecord",
    "asynctc_register_backends",
    "read_record",
    "rewrite_record",
    "write_record",
]

ATTACH_TYPES = hooklib.ATTACH_TYPES
DIRECTIONS = {v: k for k, v in ATTACH_TYPES.items()}

# errnos with which the kernel refuses an in-place link update that a make-before-break can still do
FALLBACK_ERRNOS = frozenset({_errno.EINVAL, _errno.EOPNOTSUPP, 524})  # 524: ENOTSUPP (kernel-internal)
MBB_RETRIES = 3
# Beside a pin while a make-before-break moves it to the new link (bpffs refuses dots in names).
NEXT_SUFFIX = "_asynctc_next"
# Beside a pin: asynctc's record of who pinned the link (a one-entry array map; bpffs holds BPF objects).
RECORD_SUFFIX = "_record"
RECORD_MAGIC = b"ATCL"
_RECORD_HEAD = struct.Struct("=4sIIII")
RECORD_SIZE = 128

log = logging.getLogger("asynctc")


class LinkAttachment(BackendAttachment):
    """A tcx link held by its fd."""

    def __init__(self, fd: int, info: AttachmentInfo) -> None:
        super().__init__(info)
        self.fd: int | None = fd

    def take_fd(self) -> int | None:
        fd, self.fd = self.fd, None
        return fd


def _resolve_device(names: DeviceNames, dev: str | int, netns: str | None) -> tuple[int, str]:
    """(ifindex, own name) of a device as `names` see it (an alternative name resolves to the device's own
    name); DeviceNotFound otherwise."""
    if isinstance(dev, int) and not isinstance(dev, bool) and dev > 0xFFFFFFFF:
        raise DeviceNotFound(f"no device with ifindex {dev}: an ifindex is a 32-bit number", errno=_errno.ENODEV)
    return resolve_device_here(dev, netns, names)


def _pin_over(k: Kernel, fd: int, path: str) -> None:
    """Make the pin at `path` name the link `fd`, atomically: pinned beside it, then renamed over it."""
    k.pins.pin_over(fd, path, NEXT_SUFFIX)


@dataclasses.dataclass(frozen=True, slots=True)
class LinkRecord:
    """asynctc's record beside a pinned tcx link: the session that pinned it (owner and process), the hook
    it was on, and which link it is (`link_id`; `next_link_id` while a make-before-break moves the pin to a
    new link, 0 otherwise): a record left by a crash never vouches for another link pinned at the path."""

    session_tag: str
    ifindex: int
    attach_type: int
    link_id: int = 0
    next_link_id: int = 0

    def encode(self) -> bytes:
        tag = self.session_tag.encode()
        if len(tag) > RECORD_SIZE - _RECORD_HEAD.size:
            raise ValueError(f"session tag too long for a pin record: {self.session_tag!r}")
        return (_RECORD_HEAD.pack(RECORD_MAGIC, self.ifindex, self.attach_type, self.link_id, self.next_link_id)
                + tag.ljust(RECORD_SIZE - _RECORD_HEAD.size, b"\0"))

    @classmethod
    def decode(cls, data: bytes) -> LinkRecord | None:
        if len(data) != RECORD_SIZE:
            return None
        magic, ifindex, attach_type, link_id, next_link_id = _RECORD_HEAD.unpack_from(data)
        if magic != RECORD_MAGIC:
            return None
        tag = data[_RECORD_HEAD.size:].split(b"\0", 1)[0].decode(errors="replace")
        return cls(tag, ifindex, attach_type, link_id, next_link_id)

    def names(self, info: bpf.LinkInfo) -> bool:
        """Whether this record is the one of the link `info` describes (its hook, and its id or the id of
        the link a make-before-break was moving the pin to)."""
        return (self.ifindex, self.attach_type) == (info.ifindex, info.attach_type) and info.id in (
            self.link_id, self.next_link_id)

    @property
    def owner(self) -> str | None:
        parsed = parse_session_tag(self.session_tag)
        return parsed[0] if parsed else None


def write_record(path: str, value: bytes, *, kernel: Kernel = LINUX) -> None:
    """Pin a one-entry array map holding `value` at `path` on `kernel` (in a worker thread)."""
    k = kernel
    map_fd = k.bpf.map_create_array(RECORD_SIZE, 1, name="atc_link_pin")
    try:
        k.bpf.map_update(map_fd, 0, value)
        k.pins.pin_object(map_fd, path)
    finally:
        k.bpf.close(map_fd)


def rewrite_record(path: str, record: LinkRecord, *, kernel: Kernel = LINUX) -> None:
    """Rewrite the record map pinned at `path` in place (one map update: atomic)."""
    k = kernel
    map_fd = k.pins.get_object(path)
    try:
        k.bpf.map_update(map_fd, 0, record.encode())
    finally:
        k.bpf.close(map_fd)


def read_record(path: str, *, kernel: Kernel = LINUX) -> LinkRecord | None:
    """The record pinned at `path`, or None if there is none (or something else is pinned there)."""
    data = kernel.pins.read_pinned_value(path, RECORD_SIZE)
    return LinkRecord.decode(data) if data is not None else None


def _check_owner(path: str, record: LinkRecord | None, owner: str) -> None:
    """NotOwned unless asynctc's record at `path` names `owner`."""
    if record is None:
        raise NotOwned(f"the tcx link pinned at {path} was not pinned by asynctc (no asynctc record beside it): "
                       "it is someone else's and asynctc does not touch it. A recovery tool that must take it "
                       "over passes adopt_pinned(path, foreign=True)")
    if record.owner != owner:
        raise NotOwned(f"the tcx link pinned at {path} belongs to owner {record.owner!r} (session "
                       f"{record.session_tag}), not to this session's owner {owner!r}; open the session with "
                       f"owner={record.owner!r}, or pass adopt_pinned(path, foreign=True) to take it over")


def _stale_record(k: Kernel, path: str, owner: str, foreign: bool) -> bool:
    """Remove this backend's record of `owner` (any, with `foreign`) left at `path + "_record"` without its
    link (a pin interrupted by a crash: the record is written first); True if there was one."""
    record = read_record(path + RECORD_SUFFIX, kernel=k)
    if record is None or not (foreign or record.owner == owner):
        return False
    k.pins.unpin(path + RECORD_SUFFIX)
    return True


def _other_backends_record(k: Kernel, path: str) -> bool:
    """Whether another asynctc backend's record stands at `path + "_record"` (asynctc's record maps are
    named "atc_*_pin"): that backend, not this one, answers for the path."""
    if read_record(path + RECORD_SUFFIX, kernel=k) is not None:
        return False
    try:
        fd = k.pins.get_object(path + RECORD_SUFFIX)
    except (bpf.BpfError, PinError):
        return False
    try:
        if k.bpf.fd_object_kind(fd) != "map":
            return False
        name = k.bpf.map_info(fd).name
    finally:
        k.bpf.close(fd)
    return name.startswith("atc_") and name.endswith("_pin")


def _revision_or_none(k: Kernel, ifindex: int, attach_type: int) -> int | None:
    """The hook's revision, or None if the kernel cannot say now (the device is going away...)."""
    try:
        return k.bpf.prog_query(ifindex, attach_type).revision
    except bpf.BpfError:
        return None


def _finish_interrupted_update(k: Kernel, path: str) -> None:
    """A make-before-break of the link pinned at `path` that was killed between pinning the new link
    beside the pin and renaming it over: both links are attached. Finish it, atomically (the rename drops
    the last reference to the link it replaces, which the kernel then detaches)."""
    try:
        fd = k.pins.get_object(path + NEXT_SUFFIX)
    except (bpf.BpfError, PinError):
        return  # nothing was interrupted (or nothing asynctc would touch)
    try:
        if k.bpf.fd_object_kind(fd) != "link":
            return
    finally:
        k.bpf.close(fd)
    log.warning("asynctc bpf_link: finishing an interrupted update of the link pinned at %s", path)
    k.pins.rename_over(path, NEXT_SUFFIX)


def _detach_and_close(k: Kernel, fd: int, ifindex: int, dev: str) -> bool:
    """Detach a link attached to device `ifindex` (named `dev` when it was attached) and close its fd; False
    if the kernel had already severed it (its device was deleted). Run in a thread inside the namespace.

    Whether it was severed is first asked without rtnl (the link info read takes it, and BPF_LINK_DETACH
    succeeds on a severed link, so it cannot tell): the device still in the namespace under its ifindex
    and name (one SIOCGIFNAME) means that the link was not severed, since the kernel severs a link only when
    its device goes. Otherwise (deleted, renamed, or moved to another namespace, where a tcx link stays
    attached) the link info decides: ifindex 0 there means severed. The fd is closed on every path.

    One case it cannot tell: the device deleted and another created under the same name AND ifindex (which
    takes `ip link add ... index N`, ifindexes being handed out in sequence) before this detach; the link,
    severed, is then reported detached. The session's watcher reports the deletion itself (the device's
    attachments are severed when it sees it), so only a detach racing it reads it so."""
    try:
        try:
            here = k.if_indextoname(ifindex) == dev
        except OSError:
            here = False
        if not here and k.bpf.link_info(fd).ifindex == 0:
            return False
        k.bpf.link_detach(fd)
        return True
    finally:
        k.bpf.close(fd)


class BpfLinkBackend(Backend[LinkAttachment]):
    """tcx links (Linux >= 6.6). See the module docstring."""

    name: ClassVar[str] = "bpf_link"
    can_offload: ClassVar[bool] = False
    has_revisions: ClassVar[bool] = True
    kernel_type: ClassVar[type | None] = Kernel

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.kernel: Kernel = ctx.kernel
        self._names = hooklib.ProgNameCache(self.kernel.bpf)
        self._nl: nllib.NetlinkTransport | None = None
        self._sys: SyscallThreads | None = None
        self._devnames: BoundDeviceNames | None = None

    async def open(self) -> None:
        """Open the syscall threads that make every bpf(2) call and close() of a link fd in the session's
        namespace (started as calls need them; at most the session's max_workers), the device names of the
        namespace (`Kernel.open_device_names`, made inside it: `resolve_device` then asks them on the trio
        thread), and the rtnetlink transport that lists legacy filters in `query` (tcx itself needs
        none). What was opened is closed again if a later step fails."""
        try:
            if self._sys is None:
                workers = int(self.ctx.runner.limiter.total_tokens)
                self._sys = SyscallThreads(self.ctx.runner, max_threads=max(1, workers), name="bpf_link")
            if self._devnames is None:
                self._devnames = await self.ctx.runner.run(self.kernel.open_device_names)
            if self._nl is None:
                self._nl = await nllib.start_transport(self.ctx.runner, kernel=self.kernel)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.aclose()
            raise

    async def aclose(self) -> None:
        """Close the transport and the device names, then the syscall threads once every call queued has
        run (idempotent)."""
        nl, self._nl = self._nl, None
        try:
            if nl is not None:
                await nl.aclose()
        finally:
            names, self._devnames = self._devnames, None
            try:
                if names is not None:
                    names.close()
            finally:
                sys_threads, self._sys = self._sys, None
                if sys_threads is not None:
                    await sys_threads.aclose()

    @classmethod
    async def probe(cls, ctx: BackendContext) -> Probe:
        try:
            ok, reason = await ctx.runner.run(ctx.kernel.bpf.probe_tcx)
        except OSError as exc:
            return Probe(False, f"probing tcx failed: {exc}")
        return Probe(ok, reason)

    def _transport(self) -> nllib.NetlinkTransport:
        if self._nl is None:
            raise TCError("the bpf_link backend is closed (its session has ended)")
        return self._nl

    def _syscalls(self) -> SyscallThreads:
        if self._sys is None:
            raise TCError("the bpf_link backend is closed (its session has ended)")
        return self._sys

    async def resolve_device(self, dev: str | int) -> tuple[int, str]:
        """(ifindex, the device's own name), asked of the kernel on the trio thread through the device names
        opened in the session's namespace: two SIOCGIF* ioctls (one for an ifindex) that take no rtnl and
        wait for no kernel work (`SocketDeviceNames`), so no thread is waited for (a thread round trip costs
        more than both). It never yields to other tasks either."""
        names = self._devnames
        if names is None:
            raise TCError("the bpf_link backend is closed (its session has ended)")
        return _resolve_device(names, dev, self.ctx.netns)

    def _err(self, exc: bpf.BpfError, req_dev: str | int | None = None, direction: Direction | None = None,
             program: object | None = None) -> TCError:
        return from_errno(exc.errno or 0, op=exc.op, backend=self.name, dev=req_dev, direction=direction,
                          program=program, detail=exc.log or None)

    # -- attach --------------------------------------------------------------------------------------
    @atomic
    async def attach(self, request: AttachRequest) -> LinkAttachment:
        """One kernel call (BPF_LINK_CREATE and the link's info, in one syscall-thread job) that runs to
        completion once queued, whatever happens to the caller (`must_run`): `atomic`, so the core needs no
        shielded scope around it."""
        prog_fd = request.program.fd
        flags, relative = self._anchor_flags(request)
        attach_type = ATTACH_TYPES[request.direction]

        def create() -> tuple[int, bpf.LinkInfo]:
            fd = self.kernel.bpf.link_create_tcx(
                prog_fd, request.ifindex, attach_type, flags=flags, relative=relative,
                expected_revision=request.expected_revision or 0,
            )
            try:
                return fd, self.kernel.bpf.link_info(fd)
            except BaseException:
                self.kernel.bpf.close(fd)
                raise

        try:
            fd, info = await self._syscalls().run(create, must_run=True)
        except bpf.BpfError as exc:
            p = request.placement
            if exc.errno == _errno.ENOENT and p.where in ("before", "after"):
                anchor = (f"link {p.link_id} (program {p.prog_id})" if p.link_id is not None
                          else f"program {p.prog_id}")
                raise from_errno(exc.errno, op=exc.op, backend=self.name, dev=request.dev,
                                 direction=request.direction, program=request.program,
                                 detail=f"the {p.where.title()}() anchor, {anchor}, is not on "
                                        f"{request.dev} {request.direction}") from None
            raise self._err(exc, request.dev, request.direction, request.program) from None
        return LinkAttachment(fd, AttachmentInfo(
            backend=self.name, netns=self.ctx.netns, dev=request.dev, ifindex=request.ifindex,
            direction=request.direction, prog_id=info.prog_id, link_id=info.id, handle=None,
            priority=None, offloaded=False, pinned=None,
        ))

    @staticmethod
    def _anchor_flags(request: AttachRequest) -> tuple[int, int]:
        p = request.placement
        if p.where == "first":
            return bpf.BPF_F_BEFORE, 0
        if p.where == "last":
            return bpf.BPF_F_AFTER, 0
        flags = bpf.BPF_F_BEFORE if p.where == "before" else bpf.BPF_F_AFTER
        if p.link_id is not None:
            return flags | bpf.BPF_F_LINK | bpf.BPF_F_ID, p.link_id
        if p.prog_id is None:  # pragma: no cover - the core always resolves one
            raise TCError("a Before/After placement needs an anchor")
        return flags | bpf.BPF_F_ID, p.prog_id

    # -- detach, liveness ----------------------------------------------------------------------------
    async def detach(self, att: LinkAttachment) -> bool:
        """Detach the link and close its fd; a pin of it is removed first (a pin naming a detached link
        would only make adopt_pinned fail later)."""
        if att.fd is None:
            return False
        if att.info.pinned is not None:
            # Removed first: a crash in between leaves the link held only by this process's fd, which the
            # kernel detaches when the process dies.
            try:
                await self._remove_pin(att.info.pinned)
            except PinError:
                # Nothing was detached; but a link the kernel severed is dead anyway: release its fd.
                if not await self.is_attached(att):
                    await self.release(att)
                raise
        fd = att.take_fd()
        if fd is None:
            return False
        try:
            return await self._syscalls().run(_detach_and_close, self.kernel, fd, att.info.ifindex, att.info.dev,
                                              must_run=True)
        except bpf.BpfError as exc:
            if exc.errno == _errno.ENOLINK:
                return False
            raise self._err(exc, att.info.dev, att.info.direction) from None

    async def release(self, att: LinkAttachment) -> None:
        fd = att.take_fd()
        if fd is not None:
            await self._syscalls().run(self.kernel.bpf.close, fd, must_run=True)

    async def is_attached(self, att: LinkAttachment) -> bool:
        fd = att.fd
        if fd is None:
            return False
        try:
            info = await self._syscalls().run(self.kernel.bpf.link_info, fd)
        except bpf.BpfError:
            return False
        return info.ifindex != 0

    # -- update --------------------------------------------------------------------------------------
    async def update(self, att: LinkAttachment, program: Program, *, expected: Program | None) -> Updated:
        if att.fd is None:
            raise Severed(f"{att.info.dev}: the link is closed", errno=_errno.ENOLINK)
        fd = att.fd
        new_fd = program.fd
        new_prog_id = program.id
        old_fd = expected.fd if expected is not None else None
        attach_type = ATTACH_TYPES[att.info.direction]
        ifindex = att.info.ifindex

        def in_place() -> tuple[int, int | None]:
            self.kernel.bpf.link_update(fd, new_fd, old_prog_fd=old_fd)
            # Done: the new program runs. What follows only reads; it must not make the update look failed.
            try:
                info = self.kernel.bpf.link_info(fd)
            except bpf.BpfError:
                return new_prog_id, _revision_or_none(self.kernel, ifindex, attach_type)
            if info.ifindex == 0:
                raise bpf.BpfError(_errno.ENOLINK, "link_update")
            return info.prog_id, _revision_or_none(self.kernel, ifindex, attach_type)

        try:
            prog_id, revision = await self._syscalls().run(in_place)
        except bpf.BpfError as exc:
            if exc.errno in FALLBACK_ERRNOS:
                return await self._make_before_break(att, program, expected, refused=exc)
            if exc.op == "link_update_cas" and exc.errno == _errno.EPERM and expected is not None:
                try:
                    now = f"program {(await self._syscalls().run(self.kernel.bpf.link_info, fd)).prog_id}"
                except bpf.BpfError:
                    now = "another program"
                raise Conflict(
                    f"update of {att.info.dev}/{att.info.direction.value} link {att.info.link_id} to {program} "
                    f"[bpf_link backend]: the link runs {now}, not the expected {expected}; nothing was "
                    "changed. query() and retry with the current program", errno=_errno.EPERM) from None
            raise self._err(exc, att.info.dev, att.info.direction, program) from None
        return Updated("link_update", revision, prog_id)

    async def _make_before_break(
        self, att: LinkAttachment, program: Program, expected: Program | None, *, refused: bpf.BpfError
    ) -> Updated:
        """Link the new program right before the old link (revision-checked), then retire the old link.

        Nothing is changed unless every step succeeds: if the new link cannot be made, the old one stays;
        if a later step fails, the new link is detached again. A pinned attachment is crash-safe: the new
        link is pinned beside the old pin and renamed over it (atomic on bpffs) before the old link goes,
        so at every instant the pin names an attached link. A crash between that pin and the rename leaves
        both links attached and a `<pin>_asynctc_next` pin; adopting the pin completes the update
        (`_finish_interrupted_update`). docs/cancellation.md has the whole argument.
        """
        old_fd = att.fd
        assert old_fd is not None
        attach_type = ATTACH_TYPES[att.info.direction]
        ifindex = att.info.ifindex
        new_prog_fd = program.fd
        pinned = att.info.pinned

        def step() -> tuple[int, bpf.LinkInfo, int | None]:
            old = self.kernel.bpf.link_info(old_fd)
            if old.ifindex == 0:
                raise bpf.BpfError(_errno.ENOLINK, "link_update")
            if expected is not None and old.prog_id != expected.id:
                raise Conflict(
                    f"update of {att.info.dev}/{att.info.direction.value} link {old.id} to {program} "
                    f"[bpf_link backend]: the link runs program {old.prog_id}, not the expected {expected}; "
                    "nothing was changed. query() and retry with the current program",
                    errno=_errno.EPERM,
                )
            rev = self.kernel.bpf.prog_query(ifindex, attach_type).revision
            fd = self.kernel.bpf.link_create_tcx(
                new_prog_fd, ifindex, attach_type,
                flags=bpf.BPF_F_BEFORE | bpf.BPF_F_LINK | bpf.BPF_F_ID, relative=old.id, expected_revision=rev,
            )
            moved = False
            record: LinkRecord | None = None
            try:
                info = self.kernel.bpf.link_info(fd)
                if pinned is not None:
                    # The new program runs now (just before the old one). The record vouches for the new link
                    # too, then the pin names it, atomically.
                    record = read_record(pinned + RECORD_SUFFIX, kernel=self.kernel)
                    if record is not None:
                        # The pin names the old link until the rename: the record says so (an earlier update
                        # killed before its last step may have left the record a link behind).
                        rewrite_record(pinned + RECORD_SUFFIX,
                                       dataclasses.replace(record, link_id=old.id, next_link_id=info.id),
                                       kernel=self.kernel)
                    _pin_over(self.kernel, fd, pinned)
                    moved = True
                self.kernel.bpf.link_detach(old_fd)
            except BaseException:
                # Roll back: the old program keeps running alone, pinned as before.
                try:
                    if moved:
                        _pin_over(self.kernel, old_fd, pinned)  # type: ignore[arg-type]
                finally:
                    _detach_and_close(self.kernel, fd, ifindex, att.info.dev)
                raise
            # Committed: the new link is the attachment. Nothing from here on may raise (the caller would
            # say "rolled back" and keep a closed fd): the record and the revision are written and read
            # best-effort (a record still naming the new link as the next one vouches for it all the same).
            try:
                self.kernel.bpf.close(old_fd)
            except OSError:
                pass
            if pinned is not None and record is not None:  # the record read before the move
                try:
                    rewrite_record(pinned + RECORD_SUFFIX, dataclasses.replace(record, link_id=info.id, next_link_id=0),
                                   kernel=self.kernel)
                except (OSError, PinError) as exc:
                    log.warning("asynctc bpf_link: updating the record of %s failed: %s", pinned, exc)
            return fd, info, _revision_or_none(self.kernel, ifindex, attach_type)

        for attempt in range(MBB_RETRIES):
            try:
                new_fd, info, revision = await self._syscalls().run(step)
                break
            except bpf.BpfError as exc:
                if exc.errno == _errno.ESTALE and attempt + 1 < MBB_RETRIES:
                    continue  # someone changed the hook between our query and our link: try again
                err = self._err(exc, att.info.dev, att.info.direction, program)
                err.add_note(f"asynctc: in-place update was refused first ({refused}); make-before-break "
                             "failed and was rolled back: the old program keeps running")
                raise err from None
            except OSError as exc:
                raise PinError(f"make-before-break update of {att.info.dev}/{att.info.direction.value}: "
                               f"cannot move the pin {pinned} to the new link: {exc.strerror}; rolled back, "
                               "the old program keeps running", errno=exc.errno) from None
        att.fd = new_fd
        return Updated("make_before_break", revision, info.prog_id, link_id=info.id)

    # -- query ---------------------------------------------------------------------------------------
    async def query(self, ifindex: int, direction: Direction) -> Hook:
        """tcx entries in run order, then every legacy filter of the hook in run order (another session's
        or process's netlink attachments, u32 and other classifiers: they run after every tcx program)."""
        nl = self._transport()

        async def filters(i: int, d: Direction) -> list[asynctc.HookEntry]:
            return await hooklib.filter_entries(nl, i, d, self._names)

        with translated(backend=self.name, dev=ifindex, direction=direction):  # the raw error names its op
            return await hooklib.query_hook(self._syscalls(), ifindex, direction, names=self._names,
                                            backend=self.name, filters=filters)

    # -- pinning -------------------------------------------------------------------------------------
    async def pin(self, att: LinkAttachment, path: str) -> None:
        """Pin the link at `path`, with asynctc's record of it (who pinned it, where) at `path + "_record"`.

        The record is written first: a crash between the two leaves a record without a link (the link,
        held only by the dead process's fd, is gone), which adoption reports and removes; never a pinned
        link that asynctc cannot prove is its own."""
        fd = att.fd
        if fd is None:
            raise Severed("the link is closed", errno=_errno.ENOLINK)
        record = LinkRecord(self.ctx.session_tag, att.info.ifindex, ATTACH_TYPES[att.info.direction],
                            att.info.link_id or 0)

        def pin() -> None:
            write_record(path + RECORD_SUFFIX, record.encode(), kernel=self.kernel)
            try:
                self.kernel.pins.pin_object(fd, path)
            except BaseException:
                self.kernel.pins.unpin(path + RECORD_SUFFIX)
                raise

        try:
            await self._syscalls().run(pin)
        except bpf.BpfError as exc:
            raise from_errno(exc.errno or 0, op=Op.OBJ_PIN, backend=self.name, dev=path) from None

    async def unpin(self, att: LinkAttachment) -> None:
        path = att.info.pinned
        if path is None:
            return
        await self._remove_pin(path)

    async def _remove_pin(self, path: str) -> None:
        """Remove a pin asynctc made and then its record (through the verified, symlink-free walk of
        `lowlevel.pins`): a crash in between leaves only a record, never a link without one."""

        def remove() -> None:
            self.kernel.pins.unpin(path)
            self.kernel.pins.unpin(path + RECORD_SUFFIX)

        try:
            await self._syscalls().run(remove)
        except OSError as exc:
            raise PinError(f"cannot unpin {path}: {exc.strerror}", errno=exc.errno) from None

    async def adopt_pinned(self, path: str, *, foreign: bool = False) -> LinkAttachment | None:
        netns = self.ctx.netns
        owner = self.ctx.owner

        def adopt() -> tuple[int, bpf.LinkInfo, str] | None:
            ahead = read_record(path + RECORD_SUFFIX, kernel=self.kernel)
            if foreign or (ahead is not None and ahead.owner == owner):
                # Only an owner finishes an interrupted update (others are refused below, changing nothing).
                _finish_interrupted_update(self.kernel, path)
            try:
                fd = self.kernel.pins.get_object(path)
            except bpf.BpfError as exc:
                if exc.errno == _errno.ENOENT and _stale_record(self.kernel, path, owner, foreign):
                    raise PinError(f"nothing is pinned at {path}: a pin of asynctc was interrupted there (the "
                                   "link died with its process); its stale record was removed",
                                   errno=_errno.ENOENT) from None
                if exc.errno == _errno.ENOENT and _other_backends_record(self.kernel, path):
                    return None  # the netlink backend's leftover: it answers for it
                raise from_errno(exc.errno or 0, op=Op.OBJ_GET, backend=self.name, dev=path) from None
            try:
                if self.kernel.bpf.fd_object_kind(fd) != "link":
                    self.kernel.bpf.close(fd)
                    return None
                info = self.kernel.bpf.link_info(fd)
                if info.type != bpf.BPF_LINK_TYPE_TCX:
                    self.kernel.bpf.close(fd)
                    return None
                record = read_record(path + RECORD_SUFFIX, kernel=self.kernel)
                if not foreign:
                    _check_owner(path, record, owner)
                    assert record is not None
                    if info.ifindex != 0 and not record.names(info):
                        raise NotOwned(f"the tcx link pinned at {path} (link {info.id}) is not the one asynctc's "
                                       f"record beside it names (link {record.link_id}): another program pinned "
                                       "it there; pass adopt_pinned(path, foreign=True) to take it over")
                if info.ifindex == 0:
                    # A severed link never runs again: its pin (and record) only say so. Remove them.
                    self.kernel.pins.unpin(path)
                    self.kernel.pins.unpin(path + RECORD_SUFFIX)
                    raise Severed(f"the tcx link pinned at {path} was severed: its device is gone, and a "
                                  "severed link never runs again; its stale pin was removed",
                                  errno=_errno.ENOLINK)
                # The ifindex is only meaningful in the link's namespace: prove it is in ours.
                try:
                    q = self.kernel.bpf.prog_query(info.ifindex, info.attach_type)
                except bpf.BpfError:
                    q = None
                if q is None or info.id not in q.link_ids:
                    raise TCError(
                        f"the tcx link pinned at {path} is not in "
                        f"{'namespace ' + repr(netns) if netns else 'this namespace'}; open the session in "
                        "the namespace of its device"
                    )
                return fd, info, self.kernel.if_indextoname(info.ifindex)
            except BaseException:
                try:
                    self.kernel.bpf.close(fd)
                except OSError:
                    pass
                raise

        got = await self._syscalls().run(adopt)
        if got is None:
            return None
        fd, info, dev = got
        return LinkAttachment(fd, AttachmentInfo(
            backend=self.name, netns=self.ctx.netns, dev=dev, ifindex=info.ifindex,
            direction=DIRECTIONS[info.attach_type], prog_id=info.prog_id, link_id=info.id, handle=None,
            priority=None, offloaded=False, pinned=path,
        ))

    # -- events --------------------------------------------------------------------------------------
    def open_event_source(self) -> AbstractAsyncContextManager[EventSource]:
        return self.ctx.open_netlink_events()


@asynctc.hookimpl
def asynctc_register_backends(registry: asynctc.BackendRegistry) -> None:
    registry.add(BpfLinkBackend)


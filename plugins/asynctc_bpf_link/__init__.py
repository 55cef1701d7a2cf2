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

Every kernel call runs in the session's syscall threads (`asynctc.lowlevel.syscalls`). A cycle makes the
calls it needs and no more: attach = BPF_LINK_CREATE + one link info read (the link id; for tcx it can only
be read through BPF_OBJ_GET_INFO_BY_FD, which takes rtnl); detach = a link info read (a severed link has
ifindex 0: detach() then returns False, and BPF_LINK_DETACH could not tell) + BPF_LINK_DETACH (closing our
fd detaches only if nobody else holds the link: a pin, a forked child, a tool holding it by id) + close().
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import os
import socket
from contextlib import AbstractAsyncContextManager
from typing import ClassVar

import asynctc
from asynctc import (
    AttachmentInfo,
    Conflict,
    DeviceNotFound,
    Direction,
    Hook,
    PinError,
    Probe,
    Program,
    Severed,
    TCError,
    UpdateResult,
    from_errno,
)
from asynctc.backend import AttachRequest, Backend, BackendAttachment, BackendContext, EventSource
from asynctc.lowlevel import bpf
from asynctc.lowlevel import hook as hooklib
from asynctc.lowlevel import netlink as nllib
from asynctc.lowlevel.netdev import resolve_device as resolve_device_here
from asynctc.lowlevel.syscalls import SyscallThreads

__all__ = ["BpfLinkBackend", "LinkAttachment", "asynctc_register_backends"]

ATTACH_TYPES = hooklib.ATTACH_TYPES
DIRECTIONS = {v: k for k, v in ATTACH_TYPES.items()}

# errnos with which the kernel refuses an in-place link update that a make-before-break can still do
FALLBACK_ERRNOS = frozenset({_errno.EINVAL, _errno.EOPNOTSUPP, 524})  # 524: ENOTSUPP (kernel-internal)
MBB_RETRIES = 3


class LinkAttachment(BackendAttachment):
    """A tcx link held by its fd."""

    def __init__(self, fd: int, info: AttachmentInfo) -> None:
        self.fd: int | None = fd
        self.info = info

    def take_fd(self) -> int | None:
        fd, self.fd = self.fd, None
        return fd


def _resolve_device(dev: str | int, netns: str | None) -> tuple[int, str]:
    """(ifindex, own name) of a device of the calling thread's namespace (an alternative name resolves to
    the device's own name); DeviceNotFound otherwise."""
    if isinstance(dev, int) and not isinstance(dev, bool) and dev > 0xFFFFFFFF:
        raise DeviceNotFound(f"no device with ifindex {dev}: an ifindex is a 32-bit number", errno=_errno.ENODEV)
    ifindex, name = resolve_device_here(dev, netns)
    if isinstance(dev, int):
        return ifindex, name
    return resolve_device_here(ifindex, netns)


def _close_created(created: tuple[int, bpf.LinkInfo]) -> None:
    """Close the fd of a link made for an attach whose caller was cancelled meanwhile (it is unpinned and
    ours alone: closing it detaches it)."""
    os.close(created[0])


def _detach_and_close(fd: int) -> bool:
    """Detach a link and close its fd; False if the kernel had already severed it (ifindex 0)."""
    try:
        info = bpf.link_info(fd)
        if info.ifindex == 0:
            return False
        bpf.link_detach(fd)
        return True
    finally:
        os.close(fd)


class BpfLinkBackend(Backend):
    """tcx links (Linux >= 6.6). See the module docstring."""

    name: ClassVar[str] = "bpf_link"
    can_offload: ClassVar[bool] = False
    has_revisions: ClassVar[bool] = True

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self._names = hooklib.ProgNameCache()
        self._nl: nllib.NetlinkTransport | None = None
        self._sys: SyscallThreads | None = None

    async def open(self) -> None:
        """Open the rtnetlink transport that lists legacy cls_bpf filters in `query` (tcx itself needs
        none), and the syscall threads that make every bpf(2) call, close() of a link fd and device lookup
        in the session's namespace (started as calls need them; at most the session's max_workers)."""
        if self._sys is None:
            workers = int(self.ctx.runner.limiter.total_tokens)
            self._sys = SyscallThreads(self.ctx.runner, max_threads=max(1, workers), name="bpf_link")
        if self._nl is None:
            self._nl = await nllib.start_transport(self.ctx.runner)

    async def aclose(self) -> None:
        """Close the transport, then the syscall threads once every call queued has run (idempotent)."""
        nl, self._nl = self._nl, None
        try:
            if nl is not None:
                await nl.aclose()
        finally:
            sys_threads, self._sys = self._sys, None
            if sys_threads is not None:
                await sys_threads.aclose()

    @classmethod
    async def probe(cls, ctx: BackendContext) -> Probe:
        try:
            ok, reason = await ctx.runner.run(bpf.probe_tcx)
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
        """(ifindex, the device's own name), asked of the kernel in a syscall thread (two SIOCGIF* ioctls
        that take no rtnl: far cheaper than an RTM_GETLINK and decoding its answer)."""
        return await self._syscalls().run(_resolve_device, dev, self.ctx.netns)

    def _err(self, exc: bpf.BpfError, req_dev: str | int | None = None, direction: Direction | None = None,
             program: object | None = None) -> TCError:
        return from_errno(exc.errno or 0, op=exc.op, backend=self.name, dev=req_dev, direction=direction,
                          program=program, detail=exc.log or None)

    # -- attach --------------------------------------------------------------------------------------
    async def attach(self, request: AttachRequest) -> LinkAttachment:
        prog_fd = request.program.fd
        flags, relative = self._anchor_flags(request)
        attach_type = ATTACH_TYPES[request.direction]

        def create() -> tuple[int, bpf.LinkInfo]:
            fd = bpf.link_create_tcx(
                prog_fd, request.ifindex, attach_type, flags=flags, relative=relative,
                expected_revision=request.expected_revision or 0,
            )
            try:
                return fd, bpf.link_info(fd)
            except BaseException:
                os.close(fd)
                raise

        try:
            fd, info = await self._syscalls().run(create, discard=_close_created)
        except bpf.BpfError as exc:
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
    async def detach(self, att: BackendAttachment) -> bool:
        assert isinstance(att, LinkAttachment)
        fd = att.take_fd()
        if fd is None:
            return False
        try:
            return await self._syscalls().run(_detach_and_close, fd, must_run=True)
        except bpf.BpfError as exc:
            if exc.errno == _errno.ENOLINK:
                return False
            raise self._err(exc, att.info.dev, att.info.direction) from None

    async def release(self, att: BackendAttachment) -> None:
        assert isinstance(att, LinkAttachment)
        fd = att.take_fd()
        if fd is not None:
            await self._syscalls().run(os.close, fd, must_run=True)

    async def is_attached(self, att: BackendAttachment) -> bool:
        assert isinstance(att, LinkAttachment)
        fd = att.fd
        if fd is None:
            return False
        try:
            info = await self._syscalls().run(bpf.link_info, fd)
        except bpf.BpfError:
            return False
        return info.ifindex != 0

    # -- update --------------------------------------------------------------------------------------
    async def update(self, att: BackendAttachment, program: Program, *, expected: Program | None) -> UpdateResult:
        assert isinstance(att, LinkAttachment)
        if att.fd is None:
            raise Severed(f"{att.info.dev}: the link is closed", errno=_errno.ENOLINK)
        fd = att.fd
        new_fd = program.fd
        old_fd = expected.fd if expected is not None else None
        attach_type = ATTACH_TYPES[att.info.direction]
        ifindex = att.info.ifindex

        def in_place() -> tuple[int, int]:
            bpf.link_update(fd, new_fd, old_prog_fd=old_fd)
            info = bpf.link_info(fd)
            if info.ifindex == 0:
                raise bpf.BpfError(_errno.ENOLINK, "link_update")
            return info.prog_id, bpf.prog_query(ifindex, attach_type).revision

        try:
            prog_id, revision = await self._syscalls().run(in_place)
        except bpf.BpfError as exc:
            if exc.errno in FALLBACK_ERRNOS:
                return await self._make_before_break(att, program, expected, refused=exc)
            raise self._err(exc, att.info.dev, att.info.direction, program) from None
        att.info = dataclasses.replace(att.info, prog_id=prog_id)
        return UpdateResult("link_update", revision)

    async def _make_before_break(
        self, att: LinkAttachment, program: Program, expected: Program | None, *, refused: bpf.BpfError
    ) -> UpdateResult:
        """Link the new program right before the old link (revision-checked), then detach the old link.

        Nothing is changed unless every step succeeds: if the new link cannot be made, the old one stays;
        if the old link cannot be detached, the new one is detached again.
        """
        old_fd = att.fd
        assert old_fd is not None
        attach_type = ATTACH_TYPES[att.info.direction]
        ifindex = att.info.ifindex
        new_prog_fd = program.fd

        def step() -> tuple[int, bpf.LinkInfo, int]:
            old = bpf.link_info(old_fd)
            if old.ifindex == 0:
                raise bpf.BpfError(_errno.ENOLINK, "link_update")
            if expected is not None and old.prog_id != expected.id:
                raise Conflict(
                    f"update of {att.info.dev}/{att.info.direction.value} link {old.id}: the program on the "
                    f"hook is {old.prog_id}, not the expected {expected.id}; nothing was changed",
                    errno=_errno.EPERM,
                )
            rev = bpf.prog_query(ifindex, attach_type).revision
            fd = bpf.link_create_tcx(
                new_prog_fd, ifindex, attach_type,
                flags=bpf.BPF_F_BEFORE | bpf.BPF_F_LINK | bpf.BPF_F_ID, relative=old.id, expected_revision=rev,
            )
            try:
                info = bpf.link_info(fd)
                # The new program runs now (just before the old one); the old link may go.
                bpf.link_detach(old_fd)
            except BaseException:
                _detach_and_close(fd)  # roll back: the old program keeps running alone
                raise
            os.close(old_fd)
            return fd, info, bpf.prog_query(ifindex, attach_type).revision

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
        att.fd = new_fd
        att.info = dataclasses.replace(att.info, prog_id=info.prog_id, link_id=info.id)
        if att.info.pinned is not None:
            # The pin named the old link; move it to the new one so it keeps meaning this attachment.
            await self._repin(att, att.info.pinned)
        return UpdateResult("make_before_break", revision)

    async def _repin(self, att: LinkAttachment, path: str) -> None:
        fd = att.fd
        assert fd is not None

        def repin() -> None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            bpf.obj_pin(fd, path)

        try:
            await self._syscalls().run(repin)
        except bpf.BpfError as exc:
            att.info = dataclasses.replace(att.info, pinned=None)
            raise from_errno(exc.errno or 0, op="obj_pin", backend=self.name, dev=path) from None

    # -- query ---------------------------------------------------------------------------------------
    async def query(self, ifindex: int, direction: Direction) -> Hook:
        """tcx entries in run order, then the hook's cls_bpf filters (another session's or process's
        netlink attachments run after every tcx program)."""
        nl = self._transport()

        async def filters(i: int, d: Direction) -> list[asynctc.HookEntry]:
            return await hooklib.cls_bpf_entries(nl, i, d, self._names)

        return await hooklib.query_hook(self._syscalls(), ifindex, direction, names=self._names,
                                        backend=self.name, filters=filters)

    # -- pinning -------------------------------------------------------------------------------------
    async def pin(self, att: BackendAttachment, path: str) -> None:
        assert isinstance(att, LinkAttachment)
        fd = att.fd
        if fd is None:
            raise Severed("the link is closed", errno=_errno.ENOLINK)
        if att.info.pinned is not None:
            if att.info.pinned == path:
                return
            raise PinError(f"{att.info.dev}: already pinned at {att.info.pinned}; unpin() first")
        try:
            await self._syscalls().run(bpf.obj_pin, fd, path)
        except bpf.BpfError as exc:
            raise from_errno(exc.errno or 0, op="obj_pin", backend=self.name, dev=path) from None
        att.info = dataclasses.replace(att.info, pinned=path)

    async def unpin(self, att: BackendAttachment) -> None:
        assert isinstance(att, LinkAttachment)
        path = att.info.pinned
        if path is None:
            return
        try:
            await self._syscalls().run(os.unlink, path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PinError(f"cannot unpin {path}: {exc.strerror}", errno=exc.errno) from None
        att.info = dataclasses.replace(att.info, pinned=None)

    async def adopt_pinned(self, path: str) -> LinkAttachment | None:
        netns = self.ctx.netns

        def adopt() -> tuple[int, bpf.LinkInfo, str] | None:
            try:
                fd = bpf.obj_get(path)
            except bpf.BpfError as exc:
                raise from_errno(exc.errno or 0, op="obj_get", backend=self.name, dev=path) from None
            try:
                if bpf.fd_object_kind(fd) != "link":
                    os.close(fd)
                    return None
                info = bpf.link_info(fd)
                if info.type != bpf.BPF_LINK_TYPE_TCX:
                    os.close(fd)
                    return None
                if info.ifindex == 0:
                    raise Severed(f"the tcx link pinned at {path} was severed: its device is gone; unpin it",
                                  errno=_errno.ENOLINK)
                # The ifindex is only meaningful in the link's namespace: prove it is in ours.
                try:
                    q = bpf.prog_query(info.ifindex, info.attach_type)
                except bpf.BpfError:
                    q = None
                if q is None or info.id not in q.link_ids:
                    raise TCError(
                        f"the tcx link pinned at {path} is not in "
                        f"{'namespace ' + repr(netns) if netns else 'this namespace'}; open the session in "
                        "the namespace of its device"
                    )
                return fd, info, socket.if_indextoname(info.ifindex)
            except BaseException:
                try:
                    os.close(fd)
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
        from asynctc._monitor_netlink import event_source_for

        return event_source_for(self.ctx)


@asynctc.hookimpl
def asynctc_register_backends(registry: asynctc.BackendRegistry) -> None:
    registry.add(BpfLinkBackend)


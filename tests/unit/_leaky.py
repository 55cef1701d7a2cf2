"""Deliberately leaking mock backends, registered by a plugin object: what the stress harness must catch."""

from __future__ import annotations

from typing import ClassVar

import asynctc
from asynctc.backend import BackendAttachment
from asynctc_bpf_link import LinkAttachment
from asynctc_mock import MockBackend


class SkipsDetaching(MockBackend):
    """A third-party backend with a bug: it says "detached" and leaves the link in the kernel."""

    name: ClassVar[str] = "leaky"

    async def detach(self, att: BackendAttachment) -> bool:
        return True


class KeepsLinksOpen(MockBackend):
    """A subtler bug: the link is detached from its hook, but its fd is never closed."""

    name: ClassVar[str] = "fdleak"

    async def detach(self, att: BackendAttachment) -> bool:
        if isinstance(att, LinkAttachment) and att.fd is not None:
            try:
                await self.ctx.runner.run(self.kernel.bpf.link_detach, att.fd)  # and the fd stays open
            except OSError:
                return False
            return True
        return await super().detach(att)


class LeakyPlugin:
    @asynctc.hookimpl
    def asynctc_register_backends(self, registry: asynctc.BackendRegistry) -> None:
        registry.add(SkipsDetaching)
        registry.add(KeepsLinksOpen)

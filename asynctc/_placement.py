"""Placement: where a program goes on a hook, resolved from a public Position (a pure function)."""

from __future__ import annotations

from typing import Literal

from ._attachment import Attachment
from ._errors import AnchorNotFound
from ._program import Program
from ._types import After, Before, Direction, First, Last, Position, State
from .backend import Placement

__all__ = ["resolve_placement"]

_FIRST = Placement("first")  # frozen: one of each serves every attach
_LAST = Placement("last")


def resolve_placement(position: Position, ifindex: int, direction: Direction) -> Placement:
    """The Placement for `position` on the hook (ifindex, direction).

    An Attachment anchor must be attached and on the same hook (AnchorNotFound otherwise); a Program anchor
    or a program id is looked up by the kernel (AnchorNotFound there if it is not on the hook).
    """
    if isinstance(position, Last):
        return _LAST
    if isinstance(position, First):
        return _FIRST
    if isinstance(position, Before | After):
        where: Literal["before", "after"] = "before" if isinstance(position, Before) else "after"
        anchor = position.anchor
        if isinstance(anchor, Attachment):
            if anchor.state is not State.ATTACHED:
                raise AnchorNotFound(f"the anchor {anchor!r} is not attached; anchor to a live attachment")
            ai = anchor.info
            if ai.ifindex != ifindex or ai.direction is not direction:
                raise AnchorNotFound(
                    f"the anchor {anchor!r} is on {ai.dev}/{ai.direction.value}, not on this hook; "
                    "anchor to an attachment on the same device and direction"
                )
            return Placement(where, prog_id=ai.prog_id, link_id=ai.link_id, priority=ai.priority,
                             handle=ai.handle)
        if isinstance(anchor, Program):
            return Placement(where, prog_id=anchor.id)
        if isinstance(anchor, int) and not isinstance(anchor, bool) and anchor > 0:
            if anchor >= 2**32:
                raise ValueError(f"a Before/After anchor program id must be in 1..2**32-1, got {anchor}")
            return Placement(where, prog_id=anchor)
        raise TypeError(
            f"a Before/After anchor is a Program, an Attachment or a positive program id, got {anchor!r}"
        )
    raise TypeError(f"position must be asynctc.First(), Last(), Before(x) or After(x), got {position!r}")

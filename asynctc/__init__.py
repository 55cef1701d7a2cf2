"""asynctc: attach eBPF programs to Linux traffic control from async Python (trio).

    import asynctc

    async with asynctc.open_session() as session:
        async with session.open_attachment("eth0", "ingress", program) as att:
            ...

    async with asynctc.open_object("prog.o") as obj:      # a clang-compiled object, through libbpf
        ...obj.program("count")..., obj.map("hits").lookup(0)

Everything public is re-exported here; nothing else is public except the `asynctc.backend`,
`asynctc.events`, `asynctc.hookspecs`, `asynctc.programs`, `asynctc.lowlevel` and `asynctc.testing` modules.
"""

from . import events as events
from . import programs as programs
from ._attachment import Attachment as Attachment
from ._errors import AlreadyAttached as AlreadyAttached
from ._errors import AnchorNotFound as AnchorNotFound
from ._errors import BackendUnavailable as BackendUnavailable
from ._errors import CleanupError as CleanupError
from ._errors import Conflict as Conflict
from ._errors import DeviceNotFound as DeviceNotFound
from ._errors import HookFull as HookFull
from ._errors import NotOwned as NotOwned
from ._errors import OffloadError as OffloadError
from ._errors import Op as Op
from ._errors import PermissionDenied as PermissionDenied
from ._errors import PinError as PinError
from ._errors import ProgramError as ProgramError
from ._errors import Severed as Severed
from ._errors import StaleRevision as StaleRevision
from ._errors import TCError as TCError
from ._errors import from_errno as from_errno
from ._errors import translated as translated
from ._interrupt import Interrupted as Interrupted
from ._interrupt import run_until_interrupted as run_until_interrupted
from ._map import Map as Map
from ._monitor import Monitor as Monitor
from ._object import BpfObject as BpfObject
from ._object import load_program as load_program
from ._object import open_object as open_object
from ._plugins import BackendRegistry as BackendRegistry
from ._plugins import PluginError as PluginError
from ._plugins import PluginLoadWarning as PluginLoadWarning
from ._program import Program as Program
from ._session import Session as Session
from ._session import open_session as open_session
from ._types import After as After
from ._types import AttachmentInfo as AttachmentInfo
from ._types import Before as Before
from ._types import Direction as Direction
from ._types import First as First
from ._types import Hook as Hook
from ._types import HookEntry as HookEntry
from ._types import Last as Last
from ._types import Position as Position
from ._types import Probe as Probe
from ._types import State as State
from ._types import UpdateResult as UpdateResult
from .backend import Backend as Backend
from .hookspecs import hookimpl as hookimpl

__version__ = "0.1.0"

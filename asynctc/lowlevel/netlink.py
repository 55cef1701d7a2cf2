"""rtnetlink for asynctc, by concern: `nlsock` (sockets), `transport` (requests with ACKs and dumps, over
one I/O thread per transport) and `multicast` (events). This module re-exports their public names under the
name they have always had.
"""

from __future__ import annotations

from .multicast import EventsLost as EventsLost
from .multicast import MulticastSocket as MulticastSocket
from .multicast import open_multicast_socket as open_multicast_socket
from .nlsock import NETLINK_CAP_ACK as NETLINK_CAP_ACK
from .nlsock import NETLINK_EXT_ACK as NETLINK_EXT_ACK
from .nlsock import SO_RCVBUFFORCE as SO_RCVBUFFORCE
from .nlsock import SOL_NETLINK as SOL_NETLINK
from .nlsock import NonblockingReceiver as NonblockingReceiver
from .nlsock import open_netlink_socket as open_netlink_socket
from .transport import NetlinkError as NetlinkError
from .transport import NetlinkTransport as NetlinkTransport
from .transport import RequestBuilder as RequestBuilder
from .transport import open_transport as open_transport
from .transport import start_transport as start_transport

__all__ = [
    "NETLINK_CAP_ACK",
    "NETLINK_EXT_ACK",
    "SOL_NETLINK",
    "SO_RCVBUFFORCE",
    "EventsLost",
    "MulticastSocket",
    "NetlinkError",
    "NetlinkTransport",
    "NonblockingReceiver",
    "RequestBuilder",
    "open_multicast_socket",
    "open_netlink_socket",
    "open_transport",
    "start_transport",
]

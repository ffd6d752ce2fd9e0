"""Running things on nodes: the Transport protocol, the local and SSH transports."""

from ugrod.nodes.transport.base import (
    CommandResult,
    HostKeyError,
    Stream,
    Transport,
    TransportError,
    node_deadline,
)

__all__ = [
    "CommandResult",
    "HostKeyError",
    "Stream",
    "Transport",
    "TransportError",
    "node_deadline",
]

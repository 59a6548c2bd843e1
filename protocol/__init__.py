"""SPINN wire protocol, sans-I/O: framing, messages, state machine, activation packing.

Nothing here imports asyncio, socket or torch: the runtime adapters feed bytes in and get
events out (docs/PROTOCOL.md is the specification).
"""

from protocol.connection import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    Event,
)
from protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TensorError,
)
from protocol.messages import (
    PROTOCOL_VERSION,
    Auth,
    Bye,
    Cancel,
    Challenge,
    Error,
    Hello,
    Infer,
    Message,
    MessageType,
    Ping,
    Pong,
    Result,
    Welcome,
)
from protocol.packing import CODECS, PackedTensor, pack, should_compress, unpack
from protocol.state import ConnectionState, Role

__all__ = [
    "CODECS",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Auth",
    "Bye",
    "Cancel",
    "Challenge",
    "Connection",
    "ConnectionClosed",
    "ConnectionConfig",
    "ConnectionState",
    "Error",
    "ErrorCode",
    "Event",
    "Hello",
    "Infer",
    "LocalProtocolError",
    "Message",
    "MessageType",
    "PackedTensor",
    "Ping",
    "Pong",
    "ProtocolError",
    "RemoteProtocolError",
    "Result",
    "Role",
    "TensorError",
    "Welcome",
    "pack",
    "should_compress",
    "unpack",
]

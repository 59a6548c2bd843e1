"""The messages of the SPINN wire protocol and their msgpack encoding (PROTOCOL.md §4–5).

Every message is a frozen, slotted dataclass tagged by a `MessageType`. On the wire a
message is the msgpack array ``[type, {field: value, ...}]``; fields with a default may
be omitted, and unknown keys are ignored so that later versions can add optional fields
(PROTOCOL.md §9).
"""

from __future__ import annotations

import enum
import math
from dataclasses import MISSING, dataclass
from typing import Any, Final, TypeAlias

import msgpack

from protocol.auth import MAX_NONCE_SIZE, MIN_NONCE_SIZE, PROOF_SIZE
from protocol.description import Description
from protocol.errors import ErrorCode, RemoteProtocolError, TensorError
from protocol.framing import FRAME_HEADER
from protocol.tensor import DICT_CODEC, PackedTensor

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "MAX_ID",
    "MAX_STRING",
    "MessageType",
    "Hello",
    "Welcome",
    "Infer",
    "Result",
    "Cancel",
    "Ping",
    "Pong",
    "Error",
    "Bye",
    "Challenge",
    "Auth",
    "Message",
    "MESSAGE_CLASSES",
    "encode_message",
    "encode_message_parts",
    "frame_bytes",
    "infer_envelope_bytes",
    "message_type",
    "decode_message",
    "split_message",
    "decode_fields",
]

PROTOCOL_VERSION: Final = 2
"""The protocol version this package speaks and a device sends in HELLO (§9)."""

SUPPORTED_VERSIONS: Final = (1, 2)
"""Versions a server accepts in HELLO and answers in kind (PROTOCOL.md §9): version 1 is
version 2 without WELCOME's description."""

MAX_ID: Final = 2**64 - 1
"""Largest request id or ping sequence number (unsigned 64-bit)."""

MAX_STRING: Final = 4096
"""Longest text field in characters (names, model id, error messages, codec names)."""


class MessageType(enum.IntEnum):
    """The type tag, first element of every frame's msgpack array (PROTOCOL.md §5)."""

    HELLO = 1
    WELCOME = 2
    INFER = 3
    RESULT = 4
    CANCEL = 5
    PING = 6
    PONG = 7
    ERROR = 8
    BYE = 9
    CHALLENGE = 10
    AUTH = 11


def _check_int(name: str, value: object, lo: int = 0, hi: int = MAX_ID) -> None:
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def _float(obj: object, name: str, value: object, *, lo: float = -math.inf) -> float:
    # msgpack peers may encode an integral float as an int; accept it, but never a bool.
    if type(value) is int:
        value = float(value)
        object.__setattr__(obj, name, value)
    if type(value) is not float:
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < lo:
        bound = "" if lo == -math.inf else f" >= {lo}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value}")
    return value


def _check_time(name: str, value: object) -> None:
    """A PING's timestamp: int or float, kept as sent, because PONG echoes it unchanged
    (PROTOCOL.md §5.7): an integer stays an integer, so the pinger gets back its bytes."""
    if type(value) is int:
        if not -(2**63) <= value <= MAX_ID:
            raise ValueError(f"{name} must fit a msgpack integer, got {value}")
        return
    if type(value) is not float:
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def _check_str(name: str, value: object) -> None:
    if type(value) is not str:
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if len(value) > MAX_STRING:
        raise ValueError(f"{name} is {len(value)} characters long; at most {MAX_STRING} allowed")


def _str_tuple(obj: object, name: str, value: object) -> None:
    if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(obj, name, value)
    if not isinstance(value, tuple):
        raise TypeError(f"{name} must be a sequence of str, got {type(value).__name__}")
    if len(value) > 64:
        raise ValueError(f"{name} lists {len(value)} entries; at most 64 allowed")
    for item in value:
        _check_str(f"{name} entry", item)


def _check_bytes(name: str, value: object, lo: int, hi: int) -> None:
    if type(value) is not bytes:
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    if not lo <= len(value) <= hi:
        raise ValueError(f"{name} must be {lo}..{hi} bytes long, got {len(value)}")


def _check_sha(name: str, value: object) -> None:
    _check_str(name, value)
    assert isinstance(value, str)
    if value and (len(value) != 64 or value.strip("0123456789abcdef")):
        raise ValueError(f"{name} must be empty or 64 lowercase hex digits, got {value!r}")


@dataclass(frozen=True, slots=True)
class Hello:
    """Device → server, first frame: what the device speaks and which model it runs."""

    version: int
    """Protocol version of the device (`PROTOCOL_VERSION`); one the server speaks."""
    model_id: str
    """Identifier of the progressive model (checkpoint `model_id`); from version 2, empty
    asks for whatever model the server serves (WELCOME names and describes it)."""
    weights_sha256: str
    """sha256 of the model weights, 64 lowercase hex digits (empty: unknown)."""
    codecs: tuple[str, ...]
    """Packing codecs the device can send, in order of preference."""
    device_name: str = ""
    """Free-form name of the device, for logs."""
    auth_nonce: bytes = b""
    """Device nonce of the token handshake (PROTOCOL.md §10); empty: no authentication."""
    dictionaries_sha256: str = ""
    """sha256 of the device's zstd dictionary file (PROTOCOL.md §6.7); empty: none."""

    def __post_init__(self) -> None:
        _check_int("version", self.version, 0, 2**32 - 1)
        _check_str("model_id", self.model_id)
        _check_sha("weights_sha256", self.weights_sha256)
        _str_tuple(self, "codecs", self.codecs)
        _check_str("device_name", self.device_name)
        if self.auth_nonce != b"":
            _check_bytes("auth_nonce", self.auth_nonce, MIN_NONCE_SIZE, MAX_NONCE_SIZE)
        _check_sha("dictionaries_sha256", self.dictionaries_sha256)


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server → device, answer to HELLO: the handshake succeeded."""

    version: int
    """Protocol version of the server; equal to the HELLO's."""
    model_id: str
    """Identifier of the model the server serves."""
    weights_sha256: str
    """sha256 of the server's weights, 64 lowercase hex digits (empty: unknown)."""
    codecs: tuple[str, ...]
    """Codecs the server accepts, a subset of the HELLO's; INFER may use only these."""
    reports_compute_time: bool
    """True when every RESULT carries `compute_ms`, the server-side compute time."""
    server_name: str = ""
    """Free-form name of the server, for logs."""
    dictionaries_sha256: str = ""
    """sha256 of the server's zstd dictionary file (PROTOCOL.md §6.7); empty: none."""
    description: Description | None = None
    """The model and limits of the server (PROTOCOL.md §5.12); required from version 2."""

    def __post_init__(self) -> None:
        _check_int("version", self.version, 0, 2**32 - 1)
        _check_str("model_id", self.model_id)
        _check_sha("weights_sha256", self.weights_sha256)
        _str_tuple(self, "codecs", self.codecs)
        if type(self.reports_compute_time) is not bool:
            raise TypeError("reports_compute_time must be a bool")
        _check_str("server_name", self.server_name)
        _check_sha("dictionaries_sha256", self.dictionaries_sha256)
        if isinstance(self.description, dict):
            object.__setattr__(self, "description", Description.from_wire(self.description))
        if self.description is not None and not isinstance(self.description, Description):
            raise TypeError(f"description must be a map, got {type(self.description).__name__}")


@dataclass(frozen=True, slots=True)
class Infer:
    """Device → server: finish the inference of one input from the activation at `split`."""

    request_id: int
    """Device-chosen id, unique among this connection's unanswered requests."""
    split: int
    """Split point s: the tensor is the activation entering stage s (0 = the input)."""
    thr_conf: float
    """Exit threshold in [0, 1] for the server-side exits (top-1 softmax ≥ thr_conf). A
    peer MAY omit it when `early_exits` is false (it is unused then); decoded as 1.0."""
    tensor: PackedTensor
    """The packed activation at `split`, batch dimension included."""
    deadline_ms: float | None = None
    """Milliseconds after receipt by which an answer is still useful; None: no deadline."""
    early_exits: bool = True
    """False: only the final exit answers, whatever the softmax (thr_conf is then ignored)."""

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)
        _check_int("split", self.split, 0, 2**16 - 1)
        thr = _float(self, "thr_conf", self.thr_conf)
        if not 0.0 <= thr <= 1.0:
            raise ValueError(f"thr_conf must be in [0, 1], got {thr}")
        if not isinstance(self.tensor, PackedTensor):
            raise TypeError(f"tensor must be a PackedTensor, got {type(self.tensor).__name__}")
        if self.deadline_ms is not None:
            _float(self, "deadline_ms", self.deadline_ms, lo=0.0)
        if type(self.early_exits) is not bool:
            raise TypeError(f"early_exits must be a bool, got {type(self.early_exits).__name__}")


@dataclass(frozen=True, slots=True)
class Result:
    """Server → device: the answer to one INFER."""

    request_id: int
    """The request this answers."""
    exit_index: int
    """Index of the exit that answered (0-based over all exits of the model)."""
    classes: tuple[int, ...]
    """Top-k class indices, most probable first (k ≥ 1)."""
    probs: tuple[float, ...]
    """Softmax probabilities of `classes`, same length, each in [0, 1]."""
    compute_ms: float | None = None
    """Server-side compute time in milliseconds, when the server reports it."""
    held_ms: float | None = None
    """Milliseconds from the INFER's arrival to this RESULT (queue wait, unpacking and
    compute), when the server reports compute time: the device times its uploads with it."""

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)
        _check_int("exit_index", self.exit_index, 0, 2**16 - 1)
        classes, probs = self.classes, self.probs
        if isinstance(classes, list):
            classes = tuple(classes)
            object.__setattr__(self, "classes", classes)
        if isinstance(probs, list):
            probs = tuple(probs)
            object.__setattr__(self, "probs", probs)
        if not isinstance(classes, tuple) or not isinstance(probs, tuple):
            raise TypeError("classes and probs must be sequences")
        if not 1 <= len(classes) <= 1000 or len(classes) != len(probs):
            raise ValueError(
                f"classes and probs must have the same length in [1, 1000], "
                f"got {len(classes)} and {len(probs)}"
            )
        for c in classes:
            if type(c) is not int or not 0 <= c <= 0xFFFFFFFF:  # inline: once per class
                _check_int("class index", c, 0, 0xFFFFFFFF)
        if not all(type(p) is float and 0.0 <= p <= 1.0 for p in probs):
            fixed = []
            for p in probs:
                if type(p) is int:
                    p = float(p)  # an integral float from another language's encoder
                if type(p) is not float or not 0.0 <= p <= 1.0:
                    raise ValueError(f"probabilities must be floats in [0, 1], got {p!r}")
                fixed.append(p)
            object.__setattr__(self, "probs", tuple(fixed))
        if self.compute_ms is not None:
            _float(self, "compute_ms", self.compute_ms, lo=0.0)
        if self.held_ms is not None:
            _float(self, "held_ms", self.held_ms, lo=0.0)


@dataclass(frozen=True, slots=True)
class Cancel:
    """Device → server: a local exit answered first; drop this request (paper §4.4)."""

    request_id: int
    """The request to cancel; a no-op if the server already answered it."""

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id)


@dataclass(frozen=True, slots=True)
class Ping:
    """Either side: measure the round trip; padding turns it into a bandwidth probe."""

    seq: int
    """Sequence number, unique among this side's unanswered pings."""
    sent_at: float
    """Sender's clock in seconds when sent; echoed back by PONG."""
    padding: bytes = b""
    """Filler bytes that make the frame large enough to time the uplink; not echoed."""

    def __post_init__(self) -> None:
        _check_int("seq", self.seq)
        _check_time("sent_at", self.sent_at)
        if type(self.padding) is not bytes:
            raise TypeError(f"padding must be bytes, got {type(self.padding).__name__}")


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a PING: echoes its timestamp and the size (not the bytes) of its padding."""

    seq: int
    """The PING's sequence number."""
    sent_at: float
    """The PING's `sent_at`, echoed unchanged (an integer stays an integer)."""
    received_at: float
    """Answerer's clock in seconds when the PING was received."""
    padding_len: int = 0
    """Length of the PING's padding, so the pinger can compute a bandwidth."""
    received_bytes: int | None = None
    """Bytes the answerer had read from this connection when it took `received_at`: through
    the end of the read that completed the PING (PROTOCOL.md §5.7). None: not reported."""

    def __post_init__(self) -> None:
        _check_int("seq", self.seq)
        _check_time("sent_at", self.sent_at)
        _float(self, "received_at", self.received_at)
        _check_int("padding_len", self.padding_len, 0, 2**32 - 1)
        if self.received_bytes is not None:
            _check_int("received_bytes", self.received_bytes)

    @classmethod
    def reply_to(cls, ping: Ping, received_at: float, received_bytes: int | None = None) -> Pong:
        """The PONG answering `ping`, received at `received_at` on the answerer's clock
        (after `received_bytes` of the connection, when given)."""
        return cls(ping.seq, ping.sent_at, received_at, len(ping.padding), received_bytes)


@dataclass(frozen=True, slots=True)
class Error:
    """Server → device (request-scoped or fatal), or either side (fatal) before closing."""

    code: ErrorCode
    """What went wrong."""
    message: str
    """Human-readable detail."""
    request_id: int | None = None
    """The request this answers; None makes the error fatal to the connection."""

    def __post_init__(self) -> None:
        if type(self.code) is int and not isinstance(self.code, ErrorCode):
            try:
                object.__setattr__(self, "code", ErrorCode(self.code))
            except ValueError:
                raise ValueError(f"unknown error code {self.code}") from None
        if not isinstance(self.code, ErrorCode):
            raise TypeError(f"code must be an ErrorCode, got {type(self.code).__name__}")
        _check_str("message", self.message)
        if self.request_id is not None:
            _check_int("request_id", self.request_id)

    @property
    def fatal(self) -> bool:
        """True when the error ends the connection (no request id)."""
        return self.request_id is None


@dataclass(frozen=True, slots=True)
class Bye:
    """Either side: it will send nothing more (PROTOCOL.md §7.3)."""

    reason: str = ""
    """Why the side is leaving, for logs."""

    def __post_init__(self) -> None:
        _check_str("reason", self.reason)


@dataclass(frozen=True, slots=True)
class Challenge:
    """Server → device, answers a HELLO with ``auth_nonce`` when the server holds a token:
    its nonce and its proof of the token (PROTOCOL.md §10)."""

    nonce: bytes
    """Server nonce, 16..64 random bytes."""
    proof: bytes
    """HMAC-SHA256(token, "SPINN-1 server" ‖ device nonce ‖ server nonce)."""

    def __post_init__(self) -> None:
        _check_bytes("nonce", self.nonce, MIN_NONCE_SIZE, MAX_NONCE_SIZE)
        _check_bytes("proof", self.proof, PROOF_SIZE, PROOF_SIZE)


@dataclass(frozen=True, slots=True)
class Auth:
    """Device → server, answers CHALLENGE: the device's proof of the token (§10)."""

    proof: bytes
    """HMAC-SHA256(token, "SPINN-1 device" ‖ device nonce ‖ server nonce)."""

    def __post_init__(self) -> None:
        _check_bytes("proof", self.proof, PROOF_SIZE, PROOF_SIZE)


Message: TypeAlias = (
    Hello | Welcome | Infer | Result | Cancel | Ping | Pong | Error | Bye | Challenge | Auth
)

MESSAGE_CLASSES: Final[dict[MessageType, type[Message]]] = {
    MessageType.HELLO: Hello,
    MessageType.WELCOME: Welcome,
    MessageType.INFER: Infer,
    MessageType.RESULT: Result,
    MessageType.CANCEL: Cancel,
    MessageType.PING: Ping,
    MessageType.PONG: Pong,
    MessageType.ERROR: Error,
    MessageType.BYE: Bye,
    MessageType.CHALLENGE: Challenge,
    MessageType.AUTH: Auth,
}
_TYPE_OF: Final[dict[type, MessageType]] = {cls: t for t, cls in MESSAGE_CLASSES.items()}
_TYPE_BY_TAG: Final[dict[int, MessageType]] = {int(t): t for t in MessageType}
_FIELDS: Final[dict[type, tuple[str, ...]]] = {
    cls: tuple(cls.__dataclass_fields__) for cls in MESSAGE_CLASSES.values()
}
_REQUIRED: Final[dict[type, frozenset[str]]] = {
    cls: frozenset(
        name
        for name, f in cls.__dataclass_fields__.items()
        if f.default is MISSING and f.default_factory is MISSING
    )
    for cls in MESSAGE_CLASSES.values()
}
_OMITTED_AT_DEFAULT: Final[dict[str, object]] = {
    "auth_nonce": b"",
    "dictionaries_sha256": "",
    "early_exits": True,
    "held_ms": None,
    "description": None,
    "received_bytes": None,
}
"""Optional fields added after version 1 was first written, left out at their default, so
that a message not using them is byte for byte what an older peer sends and expects."""
_OMITTED_BY_TYPE: Final[dict[type, tuple[tuple[str, object], ...]]] = {
    cls: tuple((n, d) for n, d in _OMITTED_AT_DEFAULT.items() if n in _FIELDS[cls])
    for cls in MESSAGE_CLASSES.values()
}
"""Per message class, its fields of ``_OMITTED_AT_DEFAULT`` (an encoder looks at these alone)."""
_TENSOR_FIELDS: Final = ("codec", "compressed", "shape", "scale", "zero_point", "payload")


def message_type(message: Message) -> MessageType:
    """The type tag of `message`."""
    try:
        return _TYPE_OF[type(message)]
    except KeyError:
        raise TypeError(f"not a protocol message: {type(message).__name__}") from None


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


_EMPTY_BIN: Final = b"\xc4\x00"


def encode_message_parts(message: Message) -> tuple[bytes, bytes]:
    """The msgpack body of `message` as (head, blob), body = head + blob.

    `blob` is the message's bulk bytes — INFER's tensor payload, PING's padding — written
    as the last value of the body so that the encoder never copies it (PROTOCOL.md §5.1:
    senders should put it last; receivers accept any order). Empty for other messages.
    """
    mtype = message_type(message)
    cls = type(message)
    # msgpack writes tuples as arrays and IntEnums as ints, so field values go in as they
    # are; the dict keeps the dataclass field order, which fixes the byte layout.
    fields: dict[str, Any] = {name: getattr(message, name) for name in _FIELDS[cls]}
    for name, default in _OMITTED_BY_TYPE[cls]:
        if fields[name] == default:
            del fields[name]  # e.g. a HELLO without authentication is the plain one
    blob = b""
    if isinstance(message, Infer):
        t = fields.pop("tensor")
        blob = t.payload
        fields["tensor"] = {
            "codec": t.codec,
            "compressed": t.compressed,
            "shape": t.shape,
            "scale": t.scale,
            "zero_point": t.zero_point,
            "payload": b"",
        }
    elif isinstance(message, Welcome) and message.description is not None:
        fields["description"] = message.description.to_wire()
    elif isinstance(message, Ping):
        blob = fields["padding"]  # the last field: its placeholder ends the head
        fields["padding"] = b""
    head = msgpack.packb([int(mtype), fields], use_bin_type=True)
    if not blob:
        return head, b""
    # The placeholder b"" packed as the very last value is bin8 of length 0: swap its
    # header for the real one, so the blob follows without being copied into msgpack.
    assert head.endswith(_EMPTY_BIN)
    return head[: -len(_EMPTY_BIN)] + _bin_header(len(blob)), blob


def encode_message(message: Message) -> bytes:
    """The msgpack body of one frame holding `message` (PROTOCOL.md §5)."""
    head, blob = encode_message_parts(message)
    return head + blob if blob else head


def frame_bytes(message: Message) -> int:
    """Bytes of the frame holding `message` on the wire, its length prefix included."""
    head, blob = encode_message_parts(message)
    return FRAME_HEADER.size + len(head) + len(blob)


def infer_envelope_bytes(codec: str, shape: tuple[int, ...]) -> int:
    """Bytes an INFER frame carries besides its tensor's payload: the length prefix, the
    message's fields, the tensor's description (``codec``, ``shape`` with its batch
    dimension) and the payload's bin header (§5, §6).  Measured with this module's encoder
    on a typical request: a 5-byte request id, a deadline, a tensor of 256 to
    65535 payload bytes; another request differs by a few bytes.  About 150 bytes, as
    much as a whole 28×28 frame's compressed pixels carry a third of (473 B), so a
    prediction of upload time counts it (docs/SCHEDULER.md, "upload")."""
    # msgpack sizes a bool, the scale (a float64) and a small zero point alike whatever
    # their values: 1.0 and 0 are valid for every codec.
    tensor = PackedTensor(codec, codec != DICT_CODEC, tuple(shape), 1.0, 0, bytes(256))
    message = Infer(2**32 - 1, 1, 0.75, tensor, deadline_ms=100.5)
    head, _ = encode_message_parts(message)
    return FRAME_HEADER.size + len(head)


def decode_message(obj: object) -> Message:
    """Build a message from a decoded msgpack object ``[type, {fields}]``.

    Raises `RemoteProtocolError` naming what was wrong: shape of the frame, unknown type,
    missing or mistyped field, out-of-range value. `split_message` then `decode_fields`
    are the two steps, for a receiver that checks the type against its state in between
    (PROTOCOL.md §7.5: the state is checked before the body).
    """
    mtype, fields = split_message(obj)
    return decode_fields(mtype, fields)


def split_message(obj: object) -> tuple[MessageType, dict[str, Any]]:
    """The type tag and the field map of a decoded body ``[type, {fields}]``, unchecked."""
    if not isinstance(obj, (list, tuple)) or len(obj) != 2:
        raise RemoteProtocolError("frame body must be a msgpack array [type, fields]")
    tag, fields = obj
    if type(tag) is not int:
        raise RemoteProtocolError(f"message type must be an int, got {type(tag).__name__}")
    mtype = _TYPE_BY_TAG.get(tag)  # a dict lookup: calling the IntEnum is Python code
    if mtype is None:
        raise RemoteProtocolError(f"unknown message type {tag}")
    if not isinstance(fields, dict):
        raise RemoteProtocolError(f"{mtype.name} fields must be a msgpack map")
    return mtype, fields


def decode_fields(mtype: MessageType, fields: dict[str, Any]) -> Message:
    """The message of type `mtype` from its field map (PROTOCOL.md §4–5)."""
    cls = MESSAGE_CLASSES[mtype]
    if cls is Infer and "thr_conf" not in fields and fields.get("early_exits") is False:
        # §5.3: without early exits the threshold is unused, so a peer may leave it out.
        fields = {**fields, "thr_conf": 1.0}
    if not _REQUIRED[cls] <= fields.keys():
        missing = _REQUIRED[cls] - fields.keys()
        raise RemoteProtocolError(f"{mtype.name} is missing field(s) {sorted(missing)}")
    # Unknown keys are ignored for forward compatibility (PROTOCOL.md §9).
    kwargs = {name: fields[name] for name in _FIELDS[cls] if name in fields}
    if None in kwargs.values():
        # An optional field sent as nil is one omitted: its default applies (PROTOCOL.md §4).
        required = _REQUIRED[cls]
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k in required}
    try:
        if cls is Infer:
            kwargs["tensor"] = _decode_tensor(kwargs["tensor"])
        return cls(**kwargs)
    except TensorError as exc:
        raise RemoteProtocolError(f"INFER tensor: {exc}", exc.code) from None
    except (TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"malformed {mtype.name}: {exc}") from None


def _decode_tensor(value: object) -> PackedTensor:
    if not isinstance(value, dict):
        raise TensorError(f"tensor must be a msgpack map, got {type(value).__name__}")
    missing = set(_TENSOR_FIELDS) - value.keys()
    if missing:
        raise TensorError(f"tensor is missing field(s) {sorted(missing)}")
    return PackedTensor(**{k: value[k] for k in _TENSOR_FIELDS})

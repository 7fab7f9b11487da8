"""The control protocol, as values: requests, replies, their limits and errors (pure).

The daemon answers ``cachefilesctl`` (and anyone with a socket library) on a Unix
stream socket (``docs/control.md``). One connection carries one exchange:

- the client sends **one request**: a JSON object on one line, at most
  :data:`MAX_REQUEST_BYTES` bytes including the ``\\n``::

      {"v": 1, "op": "blobs", "args": {}}

- the daemon answers with **one or more reply lines**, each a JSON object, each at most
  :data:`MAX_REPLY_BYTES`. Zero or more ``{"v": 1, "progress": {...}}`` lines (only
  ``prefetch``, ``pin`` and ``verify`` send them), then exactly one final line, either
  ``{"v": 1, "ok": true, "result": {...}}`` or
  ``{"v": 1, "ok": false, "error": {"code": "...", "message": "..."}}``;
  then the daemon closes the connection.

``v`` is the protocol version. A request of another version gets an
``unsupported_version`` error naming the versions this daemon speaks, so an old
``cachefilesctl`` against a new daemon (or the reverse) says so instead of guessing.

Every way a request can be wrong maps to one :class:`ErrorCode`; parsing never raises
anything but :class:`ControlError`, whatever the bytes (the fuzz harness
``fuzz/fuzz_control.py`` and the hypothesis tests hold it to that).

Who may ask what is decided here too (:func:`authorize`): read-only operations for
root and the members of the configured group, mutating ones for root only.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: the protocol version this module speaks (requests and replies carry it as ``v``)
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

#: a request line, ``\n`` included; a blob key is at most 2 x 255 bytes, so this is
#: plenty, and small enough that a reader can hold it without thought
MAX_REQUEST_BYTES = 8192
#: one reply line (a ``blobs`` listing of tens of thousands of blobs fits)
MAX_REPLY_BYTES = 32 << 20
#: the longest volume or cookie key, in characters (the kernel's limit is 255 bytes)
MAX_KEY_CHARS = 255
#: JSON nesting a request may have (``{"args": {...}}`` needs 2)
MAX_DEPTH = 4


class ErrorCode(enum.Enum):
    MALFORMED = "malformed"  # not one JSON object on one line
    TOO_LARGE = "too_large"  # longer than MAX_REQUEST_BYTES
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    BAD_ARGS = "bad_args"  # missing, unknown or ill-typed arguments
    FORBIDDEN = "forbidden"  # the caller may not do this (SO_PEERCRED)
    NOT_FOUND = "not_found"  # no such blob
    UNAVAILABLE = "unavailable"  # not in this mode / not configured
    BUSY = "busy"  # too many connections, or the operation is running already
    TIMEOUT = "timeout"  # the request did not arrive in time
    FAILED = "failed"  # the operation ran and failed (message says why)
    INTERNAL = "internal"  # a bug: the daemon logged it


class ControlError(Exception):
    """A request the daemon refuses, with the code and message the reply carries."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


# -- arguments -----------------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """One argument of an operation: its JSON type, whether it must be given, a check."""

    kind: type
    required: bool = False
    check: Callable[[Any], str | None] | None = None
    default: Any = None


def _blob_text(value: str) -> str | None:
    if not 0 < len(value) <= 2 * MAX_KEY_CHARS + 1:
        return f"must have 1..{2 * MAX_KEY_CHARS + 1} characters"
    if "\0" in value:
        return "must not contain NUL"
    return None


def _non_negative(value: int) -> str | None:
    return None if 0 <= value < 1 << 63 else "must lie in 0..2^63-1"


def _image_path(value: str) -> str | None:
    if value and not value.startswith("/"):
        return "must be absolute (a path inside the image, '/' for all of it)"
    if len(value) > 4096 or "\0" in value:
        return "must have at most 4096 characters and no NUL"
    return None


def _width(value: int) -> str | None:
    return None if 8 <= value <= 4096 else "must lie in 8..4096"


def _offline_policy_text(value: str) -> str | None:
    from cachefilesd_py.engine.offline_policy import OfflinePolicy

    try:
        OfflinePolicy.parse(value)
    except ValueError as exc:
        return str(exc)
    return None


def _resolution_text(value: str) -> str | None:
    return None if value in ("keep", "refetch") else "must be 'keep' or 'refetch'"


def _pattern_text(value: str) -> str | None:
    if len(value) > 1024 or "\0" in value or any(c.isspace() for c in value):
        return "must be a glob of at most 1024 characters, without blanks or NUL"
    return None


#: a blob is named as ``blobs`` lists it: ``<volume key>/<cookie key>`` (``erofs,img/img``)
BLOB_ARGS = {"blob": Arg(str, required=True, check=_blob_text)}


@dataclass(frozen=True)
class Operation:
    name: str
    mutating: bool
    args: Mapping[str, Arg] = field(default_factory=dict)
    help: str = ""


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("status", False, help="mode, fill against limits, objects, uptime"),
        Operation("stats", False, help="counters and latency percentiles"),
        Operation("metrics", False, help="Prometheus text exposition"),
        Operation(
            "blobs",
            False,
            {"limit": Arg(int, check=_non_negative, default=0)},
            help="open blobs with their presence",
        ),
        Operation(
            "show",
            False,
            {**BLOB_ARGS, "width": Arg(int, check=_width, default=64)},
            help="a blob's presence map as runs",
        ),
        Operation("verify", False, dict(BLOB_ARGS), help="bitmap vs cache file vs source"),
        Operation("cull_plan", False, help="what a cull pass would remove now, in order"),
        Operation("cull", True, help="run a cull pass now"),
        Operation(
            "prefetch",
            True,
            {
                **BLOB_ARGS,
                "offset": Arg(int, check=_non_negative, default=0),
                "length": Arg(int, check=_non_negative, default=0),
            },
            help="fetch a range of an open blob ahead (length 0: to the end)",
        ),
        Operation("reload", True, help="re-read the configuration, report what changed"),
        Operation(
            "credentials_reload",
            True,
            help="re-read the source_headers files of the configuration in force and "
            "apply them to every HTTP source, open blobs' included",
        ),
        Operation(
            "pin",
            True,
            {**BLOB_ARGS, "path": Arg(str, check=_image_path, default="")},
            help="pin a blob (kept across restarts, never culled), then preload it all; "
            "with a path, the blob is an EROFS image's primary blob: its metadata "
            "first, then the data behind the path ('/': the whole image)",
        ),
        Operation("unpin", True, dict(BLOB_ARGS), help="drop a pin made by 'pin'"),
        Operation("pins", False, help="the pins: blob, source (cli/config), size, present %"),
        Operation(
            "offline_policy",
            True,
            {
                "policy": Arg(str, required=True, check=_offline_policy_text),
                "pattern": Arg(str, check=_pattern_text, default=""),
            },
            help="what a READ of missing bytes does while its source is offline: "
            "'error' or 'wait DURATION', for a <volume>/<cookie> glob or (no pattern) "
            "the default; until the next reload or restart",
        ),
        Operation(
            "conflicts",
            False,
            help="blobs whose origin changed while cached: both versions, since when, "
            "and the decision (open, keep, refetch)",
        ),
        Operation(
            "resolve",
            True,
            {**BLOB_ARGS, "how": Arg(str, required=True, check=_resolution_text)},
            help="end a conflict: 'keep' serves the cached version on, 'refetch' takes "
            "the origin's at the blob's next OPEN (open objects keep theirs to the end)",
        ),
    )
}


@dataclass(frozen=True)
class Request:
    op: str
    args: Mapping[str, Any]
    version: int = PROTOCOL_VERSION

    @property
    def operation(self) -> Operation:
        return OPERATIONS[self.op]


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any, limit: int) -> int:
    if limit < 0:
        raise ControlError(ErrorCode.MALFORMED, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        return 1 + max((_depth(v, limit - 1) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v, limit - 1) for v in value), default=0)
    return 0


def _loads(line: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, bounded nesting."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ControlError(ErrorCode.MALFORMED, f"not UTF-8 ({exc.reason})") from None

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    try:
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise ControlError(ErrorCode.MALFORMED, f"not JSON: {exc}") from None
    _depth(value, MAX_DEPTH)
    return value


def parse_request(line: bytes) -> Request:
    """The request in ``line`` (one line, with or without its ``\\n``), checked against
    the operation table; anything else raises :class:`ControlError`."""
    if len(line) > MAX_REQUEST_BYTES:
        raise ControlError(ErrorCode.TOO_LARGE, f"a request has at most {MAX_REQUEST_BYTES} bytes")
    if line.endswith(b"\n"):
        line = line[:-1]
    if b"\n" in line:
        raise ControlError(ErrorCode.MALFORMED, "one request per connection, on one line")
    doc = _loads(line)
    if not isinstance(doc, dict):
        raise ControlError(ErrorCode.MALFORMED, "a request is a JSON object")
    version = doc.get("v")
    if type(version) is not int:
        raise ControlError(ErrorCode.MALFORMED, "'v' (the protocol version) must be an integer")
    if version not in SUPPORTED_VERSIONS:
        raise ControlError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not spoken here (this daemon speaks "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))})",
        )
    unknown = set(doc) - {"v", "op", "args"}
    if unknown:
        raise ControlError(ErrorCode.MALFORMED, f"unknown field(s): {', '.join(sorted(unknown))}")
    op = doc.get("op")
    if not isinstance(op, str):
        raise ControlError(ErrorCode.MALFORMED, "'op' must be a string")
    operation = OPERATIONS.get(op)
    if operation is None:
        raise ControlError(
            ErrorCode.UNKNOWN_OP, f"unknown operation {op[:40]!r} (known: {', '.join(OPERATIONS)})"
        )
    raw_args = doc.get("args", {})
    if not isinstance(raw_args, dict):
        raise ControlError(ErrorCode.BAD_ARGS, "'args' must be an object")
    return Request(op, check_args(operation, raw_args), version)


def check_args(operation: Operation, raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` checked against ``operation``'s arguments, with defaults filled in."""
    unknown = set(raw) - set(operation.args)
    if unknown:
        names = ", ".join(sorted(n[:40] for n in unknown))
        raise ControlError(ErrorCode.BAD_ARGS, f"{operation.name}: unknown argument(s) {names}")
    out: dict[str, Any] = {}
    for name, spec in operation.args.items():
        if name not in raw:
            if spec.required:
                raise ControlError(ErrorCode.BAD_ARGS, f"{operation.name}: '{name}' is required")
            out[name] = spec.default
            continue
        value = raw[name]
        # bool is an int in Python, never in this protocol
        if type(value) is not spec.kind:
            raise ControlError(
                ErrorCode.BAD_ARGS, f"{operation.name}: '{name}' must be {spec.kind.__name__}"
            )
        problem = spec.check(value) if spec.check is not None else None
        if problem:
            raise ControlError(ErrorCode.BAD_ARGS, f"{operation.name}: '{name}' {problem}")
        out[name] = value
    return out


def encode_request(op: str, **args: Any) -> bytes:
    """The line a client sends; checks the arguments as the daemon will."""
    operation = OPERATIONS.get(op)
    if operation is None:
        raise ControlError(ErrorCode.UNKNOWN_OP, f"unknown operation {op!r}")
    check_args(operation, args)
    line = _dumps({"v": PROTOCOL_VERSION, "op": op, "args": args})
    if len(line) > MAX_REQUEST_BYTES:
        raise ControlError(ErrorCode.TOO_LARGE, f"a request has at most {MAX_REQUEST_BYTES} bytes")
    return line


# -- replies -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A final reply: ``result`` when ``ok``, else ``error``."""

    ok: bool
    result: Any = None
    error: ControlError | None = None


@dataclass(frozen=True)
class Progress:
    fields: Mapping[str, Any]


def _jsonable(value: Any) -> Any:
    """Floats that JSON cannot carry (NaN, inf) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _dumps(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(_jsonable(doc), separators=(",", ":"), allow_nan=False).encode() + b"\n"


def encode_result(result: Any) -> bytes:
    line = _dumps({"v": PROTOCOL_VERSION, "ok": True, "result": result})
    if len(line) > MAX_REPLY_BYTES:
        return encode_error(
            ControlError(ErrorCode.FAILED, f"the reply would exceed {MAX_REPLY_BYTES} bytes")
        )
    return line


def encode_error(err: ControlError) -> bytes:
    return _dumps(
        {
            "v": PROTOCOL_VERSION,
            "ok": False,
            "error": {"code": err.code.value, "message": err.message[:1000]},
        }
    )


def encode_progress(fields: Mapping[str, Any]) -> bytes:
    return _dumps({"v": PROTOCOL_VERSION, "progress": dict(fields)})


def parse_reply(line: bytes) -> Reply | Progress:
    """A reply line as the client reads it; a line that is no reply raises
    :class:`ControlError` (``MALFORMED``), an error reply is returned, not raised."""
    if len(line) > MAX_REPLY_BYTES:
        raise ControlError(ErrorCode.TOO_LARGE, "reply line too long")
    try:
        doc = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ControlError(ErrorCode.MALFORMED, f"reply is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != PROTOCOL_VERSION:
        raise ControlError(ErrorCode.MALFORMED, "reply of another protocol version")
    if "progress" in doc:
        progress = doc["progress"]
        if not isinstance(progress, dict):
            raise ControlError(ErrorCode.MALFORMED, "progress must be an object")
        return Progress(progress)
    if doc.get("ok") is True:
        return Reply(True, doc.get("result"))
    error = doc.get("error")
    if doc.get("ok") is False and isinstance(error, dict):
        try:
            code = ErrorCode(error.get("code"))
        except ValueError:
            code = ErrorCode.INTERNAL
        return Reply(False, error=ControlError(code, str(error.get("message", ""))))
    raise ControlError(ErrorCode.MALFORMED, "reply has neither a result nor an error")


# -- who may ask what ----------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """The caller, as ``SO_PEERCRED``/``SO_PEERGROUPS`` name it (the kernel fills these
    in at ``connect()``; the caller cannot forge them)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


def authorize(operation: Operation, peer: Peer, read_gid: int | None) -> None:
    """Raise ``FORBIDDEN`` unless ``peer`` may run ``operation``: root may run all;
    members of ``read_gid`` (primary or supplementary group) the read-only ones."""
    if peer.uid == 0:
        return
    in_group = read_gid is not None and (peer.gid == read_gid or read_gid in peer.groups)
    if operation.mutating:
        raise ControlError(
            ErrorCode.FORBIDDEN, f"'{operation.name}' changes the cache: root only (uid {peer.uid})"
        )
    if not in_group:
        who = "no control_group is configured" if read_gid is None else f"gid {read_gid}"
        raise ControlError(
            ErrorCode.FORBIDDEN,
            f"'{operation.name}' is for root and the control group ({who}); uid {peer.uid} "
            "is neither",
        )

"""Framing on mesh streams: `u32 big-endian length | payload`. Control frames carry compact JSON
objects; data frames carry raw bytes. Every read is bounded, so a peer speaking garbage costs one
stream, never the node's memory.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from mesh_mcp.errors import ProtocolError

from .. import jsonlimits

CONTROL_LIMIT = 1 << 20  # JSON frames
DATA_LIMIT = 32 << 20  # request bodies and response chunks
MAX_DEPTH = 32  # JSON nesting in a control message (the deepest we send, a shard lease with its reference, is 6)
_LEN = struct.Struct(">I")


def encode(payload: bytes) -> bytes:
    return _LEN.pack(len(payload)) + payload


def encode_json(obj: dict[str, Any]) -> bytes:
    return encode(json.dumps(obj, separators=(",", ":")).encode())


async def read_frame(reader: asyncio.StreamReader, limit: int = DATA_LIMIT) -> bytes | None:
    """One frame, or None at a clean end of stream (EOF before a length)."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("stream ended inside a frame header") from exc
        return None
    (size,) = _LEN.unpack(head)
    if size > limit:
        raise ProtocolError(f"frame of {size} bytes exceeds the {limit}-byte limit")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(f"stream ended inside a {size}-byte frame") from exc


async def read_json(reader: asyncio.StreamReader, limit: int = CONTROL_LIMIT) -> dict[str, Any]:
    frame = await read_frame(reader, limit)
    if frame is None:
        raise ProtocolError("stream ended where a message was expected")
    return decode_json(frame)


def decode_json(frame: bytes) -> dict[str, Any]:
    """A control message: a JSON object nesting at most MAX_DEPTH levels, else ProtocolError. (Plain
    `json.loads` raised RecursionError for deep nesting and ValueError for integers of more than 4300 digits.)"""
    try:
        obj = jsonlimits.parse(frame, max_depth=MAX_DEPTH, max_string=len(frame))
    except (RecursionError, ValueError) as exc:  # JsonRejected, JSONDecodeError, UnicodeDecodeError, digit limit
        raise ProtocolError(f"malformed message: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("a message must be a JSON object")
    return obj


def field(obj: dict[str, Any], name: str, kind: type, max_len: int = 4096) -> Any:
    """A required field of the given type (strings and lists bounded)."""
    value = obj.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ProtocolError(f"message field {name!r} missing or not {kind.__name__}")
    if isinstance(value, str | list) and len(value) > max_len:
        raise ProtocolError(f"message field {name!r} is too long")
    return value


def close_quietly(writer: asyncio.StreamWriter) -> None:
    """Half-close our side of a stream if it is still open (never raises)."""
    try:
        writer.close()
    except Exception:
        writer.transport._closing = True  # type: ignore[attr-defined]

"""The data plane's splice in C: llama.cpp RPC bytes between nodes without the GIL or Python in the path.

Why: every token of a pipeline split crosses each stage boundary once, and each crossing goes through two relays
(the sender's and the receiver's nodes). In Python each relay hop costs a GIL hand-off and the interpreter
(P2, bench/RESULTS.md: +159–170 µs per round trip through both relays, against +50–65 µs for the same relay in C
without TLS), and a busy event loop in the node makes each hop wait up to the switch interval.

How: the tunnel is opened as before — TLS 1.3, the mesh handshake, the target request — and both ends say in
that request and its answer (inside TLS) whether they can splice natively, each with 32 random bytes. When both
can, TLS is left behind on that connection: two AES-256-GCM keys, one per direction, are derived from the two
random values (HKDF-SHA256), and `native_relay.c` carries the bytes as length-prefixed records (the length
authenticated, a per-direction record counter as the nonce) until either side ends. A record that fails
authentication ends the tunnel; nothing of it reaches llama-server or rpc-server. The keys exist only in the two
processes: the random values crossed inside the mutually authenticated TLS session.

Measured (`python bench/p2_dataplane.py --rounds 10 --pings 1000 --mib 256 --tput-rounds 2`, 2-core VM, 2026-12-06):
a GET_TENSOR-like ping through both relays, p50 for 2304 / 8192-byte answers: this splice 117.9 / 123.6 µs, the
Python one (MESH_LLM_NATIVE_RELAY=0) 182.3 / 188.2 µs, a C relay without any encryption 104.2 / 107.8 µs; relay CPU
per ping 74 µs against 132 (no encryption: 60). So it adds 14-16 µs per round trip over the unencrypted floor, where
Python adds about 80: under 10 µs per one-way crossing. Throughput in 1 MiB writes: 1067 MB/s (Python: 882), with up
to 4 records per write and per read.

The C file is compiled on first use with the system compiler against libcrypto (OpenSSL's headers:
`apt-get install libssl-dev`) into the llama.cpp build cache, under a file lock (`inference/cshared.py`). Without a
compiler or the headers, or with MESH_LLM_NATIVE_RELAY=0, the node splices in Python (`splice.py`) and says so once
in its log; a tunnel uses the native splice only when both of its ends offer it.
"""

from __future__ import annotations

import base64
import ctypes
import logging
import os
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from inference.cshared import load_shared
from mesh_mcp.errors import BuildError, ProtocolError

log = logging.getLogger("mesh_llm.dataplane")

RANDOM_BYTES = 32
CC_FLAGS = ("-O2", "-shared", "-fPIC")
LIBS = ("-lcrypto", "-lpthread")
ENDS = {0: "closed", 1: "socket error", 2: "a record failed authentication", 3: "cipher setup failed"}
_SALT = b"mesh-llm data plane native splice v1"

_lock = threading.Lock()
_loaded: list[Any] = []  # empty: not tried yet; then the ctypes function, or None


def _load() -> Any:
    if os.environ.get("MESH_LLM_NATIVE_RELAY", "1") == "0":
        log.info("data plane: MESH_LLM_NATIVE_RELAY=0, splicing in Python")
        return None
    try:
        lib = load_shared(Path(__file__).with_name("native_relay.c"), "native_relay", CC_FLAGS, LIBS)
    except BuildError as exc:
        log.warning(
            "data plane: cannot build the native splice (%s); splicing in Python, which adds about 100 µs per "
            "round trip. Install a C compiler and OpenSSL's headers (apt-get install build-essential libssl-dev).",
            exc,
        )
        return None
    fn = lib.mesh_native_splice
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint64)]
    return fn  # ctypes releases the GIL for the call


def available() -> bool:
    """Whether this process can splice natively (compiled on first use; the answer is kept)."""
    with _lock:
        if not _loaded:
            _loaded.append(_load())
        return _loaded[0] is not None


def offer() -> str | None:
    """What this end puts in the target request or its answer: its random bytes (base64), or None."""
    return base64.b64encode(os.urandom(RANDOM_BYTES)).decode() if available() else None


def keys(host_random: str, worker_random: str, *, host_side: bool) -> tuple[bytes, bytes]:
    """(send key, receive key) for this end, from both ends' offers."""
    try:
        a, b = base64.b64decode(host_random, validate=True), base64.b64decode(worker_random, validate=True)
    except ValueError as exc:
        raise ProtocolError(f"malformed native splice offer: {exc}") from exc
    if len(a) != RANDOM_BYTES or len(b) != RANDOM_BYTES:
        raise ProtocolError("a native splice offer is 32 random bytes")

    def derive(label: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=label).derive(a + b)

    to_worker, to_host = derive(b"host to worker"), derive(b"worker to host")
    return (to_worker, to_host) if host_side else (to_host, to_worker)


class NativeMeter:
    """A native tunnel's byte counts, read live from the C splice: `(local → net, net → local)` mapped to the
    RPC directions as `Meter`'s fields are."""

    def __init__(self, host_side: bool) -> None:
        self.counts = (ctypes.c_uint64 * 2)()
        self._host_side = host_side

    @property
    def to_rpc_server(self) -> int:
        return int(self.counts[0] if self._host_side else self.counts[1])

    @property
    def from_rpc_server(self) -> int:
        return int(self.counts[1] if self._host_side else self.counts[0])


def splice(local_fd: int, net_fd: int, send_key: bytes, recv_key: bytes, meter: NativeMeter) -> str:
    """Carry the tunnel's bytes until either side ends (blocking; the GIL is released); how it ended."""
    fn = _loaded[0] if _loaded else None
    if fn is None:
        raise RuntimeError("native splice used before available() said yes")
    return ENDS.get(int(fn(local_fd, net_fd, send_key, recv_key, meter.counts)), "unknown")

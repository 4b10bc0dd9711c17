"""A userspace UDP link for multi-node tests: latency, loss and partitions without tc netem.

`LinkProxy` listens on one UDP address and forwards every datagram to a target (a node's QUIC
listener). Each distinct client source address gets its own upstream socket, so the target's
replies map back to that client. Datagrams wait in a heap until their due time (`delay_ms`
one-way, both directions) and are sent by one background thread; `drop` blackholes the link,
`loss` drops at random, and `deny` blackholes only the flows whose client address it matches
(evaluated once per flow, again whenever it is reassigned). Controls are plain attributes, read
by the thread on every datagram. Loopback only: the proxy binds its listen host for both sides.

    with LinkProxy(listen=("127.0.0.12", port), target=("127.0.0.2", port)) as link:
        link.delay_ms = 50      # +100 ms round trip
        link.drop = True        # partition

`TcpLink` does the same delay for TCP (the RPC data plane in benchmarks).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import queue
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

Address = tuple[str, int]
MAX_DATAGRAM = 65535
POLL_S = 0.05  # longest the thread sleeps without a datagram or a due send


@dataclass
class Flow:
    client: Address
    upstream: socket.socket
    denied: bool = False
    deny_generation: int = -1


@dataclass
class Stats:
    forwarded: int = 0
    dropped: int = 0


class LinkProxy:
    def __init__(
        self, listen: Address, target: Address, *, delay_ms: float = 0.0, loss: float = 0.0, seed: int | None = None
    ) -> None:
        self.target = target
        self.delay_ms = delay_ms
        self.loss = loss
        self.drop = False
        self.stats = Stats()
        self._deny: Callable[[Address], bool] | None = None
        self._deny_generation = 0
        self._rng = random.Random(seed)
        self._listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._listen.bind(listen)
        except OSError:
            self._listen.close()
            raise
        self._listen.setblocking(False)
        self._flows: dict[Address, Flow] = {}
        self._queue: list[tuple[float, int, socket.socket, bytes, Address]] = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)

    @property
    def address(self) -> str:
        """`host:port` to advertise for the target behind this link."""
        host, port = self._listen.getsockname()
        return f"{host}:{port}"

    @property
    def port(self) -> int:
        return int(self._listen.getsockname()[1])

    @property
    def flows(self) -> list[Address]:
        """Client addresses seen so far."""
        return list(self._flows)

    @property
    def deny(self) -> Callable[[Address], bool] | None:
        return self._deny

    @deny.setter
    def deny(self, predicate: Callable[[Address], bool] | None) -> None:
        """Blackhole the flows whose client address `predicate` matches (None: none)."""
        self._deny = predicate
        self._deny_generation += 1

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> LinkProxy:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"link {self.address}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._wake_w.send(b"x")
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                raise RuntimeError(f"link {self.address} did not stop")
            self._thread = None
        for flow in self._flows.values():
            flow.upstream.close()
        self._flows.clear()
        self._queue.clear()
        for sock in (self._listen, self._wake_r, self._wake_w):
            sock.close()

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the thread ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listen, selectors.EVENT_READ, None)
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            while not self._stop.is_set():
                now = time.monotonic()
                timeout = min(POLL_S, max(0.0, self._queue[0][0] - now)) if self._queue else POLL_S
                for key, _ in sel.select(timeout):
                    if key.data == "wake":
                        self._wake_r.recv(64)
                    elif key.data is None:
                        self._from_client(sel)
                    else:
                        self._from_target(key.data)
                self._send_due()

    def _from_client(self, sel: selectors.BaseSelector) -> None:
        while True:
            try:
                data, client = self._listen.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            flow = self._flows.get(client)
            if flow is None:
                upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                upstream.bind((self._listen.getsockname()[0], 0))
                upstream.setblocking(False)
                flow = self._flows[client] = Flow(client, upstream)
                sel.register(upstream, selectors.EVENT_READ, flow)
            self._enqueue(flow, flow.upstream, data, self.target)

    def _from_target(self, flow: Flow) -> None:
        while True:
            try:
                data, source = flow.upstream.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if source == self.target:
                self._enqueue(flow, self._listen, data, flow.client)

    def _enqueue(self, flow: Flow, via: socket.socket, data: bytes, dest: Address) -> None:
        if flow.deny_generation != self._deny_generation:
            deny = self._deny
            flow.denied = deny is not None and deny(flow.client)
            flow.deny_generation = self._deny_generation
        if self.drop or flow.denied or (self.loss > 0 and self._rng.random() < self.loss):
            self.stats.dropped += 1
            return
        due = time.monotonic() + self.delay_ms / 1000
        heapq.heappush(self._queue, (due, next(self._seq), via, data, dest))

    def _send_due(self) -> None:
        now = time.monotonic()
        while self._queue and self._queue[0][0] <= now:
            _, _, via, data, dest = heapq.heappop(self._queue)
            self.stats.forwarded += 1  # counted first: the receiver may look at once
            try:
                via.sendto(data, dest)
            except OSError:  # a full buffer or an unreachable port: the datagram is lost, as on a wire
                self.stats.forwarded -= 1
                self.stats.dropped += 1


class TcpLink:
    """The TCP twin of `LinkProxy` for latency only: every accepted connection is forwarded to
    `target`, and every chunk waits `delay_ms` (read live) before it is sent on, in order, each way.
    Threads, blocking sockets: one reader and one sender per direction per connection.

        with TcpLink(listen=("127.0.0.12", port), target=("127.0.0.2", port), delay_ms=2.5) as link:
            ...  # +5 ms round trip on every connection through it
    """

    def __init__(self, listen: Address, target: Address, *, delay_ms: float = 0.0) -> None:
        self.target, self.delay_ms = target, delay_ms
        self.bytes_forwarded = 0
        self._listen = socket.create_server(listen)
        self._listen.settimeout(POLL_S)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self._listen.getsockname()[1])

    def start(self) -> TcpLink:
        self._spawn(self._accept)
        return self

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._listen.close()

    def __enter__(self) -> TcpLink:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _spawn(self, fn: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listen.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                pending: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
                self._spawn(self._read, src, pending)
                self._spawn(self._send, dst, pending)

    def _read(self, src: socket.socket, pending: queue.SimpleQueue[tuple[float, bytes] | None]) -> None:
        try:
            while data := src.recv(1 << 16):
                pending.put((time.monotonic() + self.delay_ms / 1000, data))
        except OSError:
            pass
        pending.put(None)

    def _send(self, dst: socket.socket, pending: queue.SimpleQueue[tuple[float, bytes] | None]) -> None:
        while (item := pending.get()) is not None:
            due, data = item
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                return
            self.bytes_forwarded += len(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

"""P2: the RPC data plane — what a relay pair (host relay + worker relay) adds to llama.cpp RPC.

Topology, every party its own process (on a real mesh the two relays are on two machines and the
endpoints are llama-server and ggml-rpc-server, both C):

    client ──TCP──► host relay ──(TLS, or TCP for the plain variants)──► worker relay ──TCP──► sink
    client ──TCP──────────────────────────────────────────────────────────────────────────────► sink  (direct)

The client and the sink speak llama.cpp's RPC framing (request `cmd:u8 | size:u64 | payload`,
response `size:u64 | payload`). A *ping* is GET_TENSOR-like: a 40-byte request answered by an
`n_embd × 4`-byte tensor (576×4 for SmolLM2-135M, 2048×4 for a 1-3B model). *Throughput* is 1 GiB
sent one way in 1 MiB writes (SET_TENSOR at load without a cache), acknowledged by the sink.
Added RTT = median relayed ping − median direct ping, measured in interleaved batches.

Implementations (relay sides of the prototypes live in this file; `dataplane` is the real module):

    asyncio-streams   asyncio streams + ssl, one copy task per direction
    asyncio-protocol  asyncio Protocols (data_received → write), ssl via asyncio's SSL protocol
    threads-sslsocket blocking sockets, two threads per connection, ssl.SSLSocket
    threads-bio       blocking sockets, two threads, ssl.SSLObject over MemoryBIOs (one lock around
                      the in-memory TLS state, socket I/O outside it)
    thread-poll       one thread per connection, non-blocking sockets + poll(), ssl.SSLSocket
    plain-threads     like threads-sslsocket without TLS (the relays' cost alone)
    c-threads         the same plain relay in C (needs `cc`): the floor of any relay on this machine
    dataplane         mesh_mcp.dataplane.relay (DataPlaneServer + Relay, with authentication)

    python bench/p2_dataplane.py [--rounds 8] [--pings 400] [--mib 1024] [--impls a,b,...] [--busy]
    python bench/p2_dataplane.py --llama [--rounds 5] [--tokens 64]   # real llama.cpp, direct vs relayed
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMPLS = (
    "asyncio-streams",
    "asyncio-protocol",
    "threads-sslsocket",
    "threads-bio",
    "thread-poll",
    "plain-threads",
    "c-threads",
    "dataplane",
)
SIZES = (576 * 4, 2048 * 4)
CHUNK = 256 << 10
GET, PUT = 1, 2
HEAD = struct.Struct("<BQ")
U64 = struct.Struct("<Q")


def nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("peer closed")
        got += n


# --- the sink (stands in for ggml-rpc-server) ------------------------------------------------------


def sink_main() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)

    def serve(conn: socket.socket) -> None:
        nodelay(conn)
        head = memoryview(bytearray(HEAD.size))
        buf = memoryview(bytearray(1 << 20))
        reply = bytes(1 << 16)
        with conn:
            try:
                while True:
                    recv_exactly(conn, head)
                    cmd, size = HEAD.unpack(head)
                    if cmd == GET:
                        recv_exactly(conn, buf[:size])
                        (n,) = U64.unpack(buf[:8])
                        conn.sendall(U64.pack(n) + reply[:n])
                    else:
                        left = size
                        while left:
                            k = conn.recv_into(buf[: min(left, len(buf))])
                            if not k:
                                raise ConnectionError("peer closed")
                            left -= k
                        conn.sendall(U64.pack(0))
            except ConnectionError:
                pass

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


# --- prototype relays ------------------------------------------------------------------------------


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mesh_mcp.mesh.credentials import make_certificate

    key = Ed25519PrivateKey.generate()
    cert = make_certificate(key, "bench")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.num_tickets = 0
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (Path(d) / "k.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        server.load_cert_chain(Path(d) / "c.pem", Path(d) / "k.pem")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client


def pump_blocking(src: socket.socket, dst: socket.socket) -> None:
    buf = memoryview(bytearray(CHUNK))
    try:
        while n := src.recv_into(buf):
            dst.sendall(buf[:n])
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                socket.socket.shutdown(s, socket.SHUT_RDWR)
            except OSError:
                pass


class BioTls:
    """An SSLObject over MemoryBIOs shared by a reading and a writing thread."""

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext, server_side: bool) -> None:
        self.raw = raw
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=server_side)
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.out.pending:
                    raw.sendall(self.out.read())
                data = raw.recv(CHUNK)
                if not data:
                    raise ConnectionError("closed in handshake") from None
                self.inc.write(data)
        if self.out.pending:
            raw.sendall(self.out.read())

    def recv(self) -> bytes:
        parts: list[bytes] = []
        while not parts:
            data = self.raw.recv(CHUNK)
            if not data:
                return b""
            with self.lock:
                self.inc.write(data)
                while True:
                    try:
                        parts.append(self.obj.read(CHUNK))
                    except ssl.SSLWantReadError:
                        break
        return b"".join(parts)

    def sendall(self, data: bytes | memoryview) -> None:
        with self.send_lock:
            with self.lock:
                self.obj.write(data)
                out = self.out.read()
            self.raw.sendall(out)


def pump_bio_in(tls: BioTls, dst: socket.socket) -> None:
    try:
        while data := tls.recv():
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (tls.raw, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def pump_bio_out(src: socket.socket, tls: BioTls) -> None:
    buf = memoryview(bytearray(CHUNK))
    try:
        while n := src.recv_into(buf):
            tls.sendall(buf[:n])
    except OSError:
        pass
    finally:
        for s in (tls.raw, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def poll_splice(a: socket.socket, b: socket.socket) -> None:
    """One thread moves both directions; `a`/`b` may be SSLSockets (non-blocking)."""
    a.setblocking(False)
    b.setblocking(False)
    pending = {a: b"", b: b""}  # bytes waiting to be written *to* the key
    other = {a: b, b: a}
    p = select.poll()
    fds = {a.fileno(): a, b.fileno(): b}
    try:
        while True:
            for s in (a, b):
                mask = select.POLLIN if not pending[other[s]] else 0
                if pending[s]:
                    mask |= select.POLLOUT
                p.register(s, mask)
            for fd, ev in p.poll():
                s = fds[fd]
                if ev & select.POLLOUT and pending[s]:
                    try:
                        n = s.send(pending[s])
                        pending[s] = pending[s][n:]
                    except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                        pass
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and not pending[other[s]]:
                    while True:  # drain, including TLS bytes already decrypted inside OpenSSL
                        try:
                            data = s.recv(CHUNK)
                        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                            break
                        if not data:
                            return
                        t = other[s]
                        try:
                            n = t.send(data)
                        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                            n = 0
                        if n < len(data):
                            pending[t] = data[n:]
                            break
    except OSError:
        pass
    finally:
        a.close()
        b.close()


def relay_threads_main(side: str, to_port: int, impl: str) -> None:
    server_ctx, client_ctx = tls_contexts()
    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        nodelay(conn)
        up = nodelay(socket.create_connection(("127.0.0.1", to_port)))
        local, net = (conn, up) if side == "host" else (up, conn)
        if impl == "plain-threads":
            pairs: list[tuple[Any, ...]] = [(pump_blocking, local, net), (pump_blocking, net, local)]
        elif impl == "threads-sslsocket":
            tls = client_ctx.wrap_socket(net) if side == "host" else server_ctx.wrap_socket(net, server_side=True)
            pairs = [(pump_blocking, local, tls), (pump_blocking, tls, local)]
        elif impl == "threads-bio":
            bio = BioTls(net, client_ctx if side == "host" else server_ctx, server_side=side == "worker")
            pairs = [(pump_bio_out, local, bio), (pump_bio_in, bio, local)]
        else:  # thread-poll
            tls = client_ctx.wrap_socket(net) if side == "host" else server_ctx.wrap_socket(net, server_side=True)
            pairs = [(poll_splice, local, tls)]
        for fn, *args in pairs:
            threading.Thread(target=fn, args=args, daemon=True).start()


async def relay_asyncio_main(side: str, to_port: int, impl: str) -> None:
    server_ctx, client_ctx = tls_contexts()
    loop = asyncio.get_running_loop()
    in_ssl = server_ctx if side == "worker" else None
    out_ssl = client_ctx if side == "host" else None

    if impl == "asyncio-streams":

        async def copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(CHUNK):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nodelay(w.get_extra_info("socket"))
            r2, w2 = await asyncio.open_connection("127.0.0.1", to_port, ssl=out_ssl)
            nodelay(w2.get_extra_info("socket"))
            await asyncio.gather(copy(r, w2), copy(r2, w))

        srv = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=in_ssl)
    else:

        class Pipe(asyncio.Protocol):
            def __init__(self) -> None:
                self.peer: Pipe | None = None
                self.transport: asyncio.Transport | None = None
                self.early: list[bytes] = []

            def connection_made(self, transport: Any) -> None:
                self.transport = transport
                nodelay(transport.get_extra_info("socket"))

            def data_received(self, data: bytes) -> None:
                if self.peer is not None and self.peer.transport is not None:
                    self.peer.transport.write(data)
                else:
                    self.early.append(data)

            def pause_writing(self) -> None:
                if self.peer is not None and self.peer.transport is not None:
                    self.peer.transport.pause_reading()

            def resume_writing(self) -> None:
                if self.peer is not None and self.peer.transport is not None:
                    self.peer.transport.resume_reading()

            def connection_lost(self, exc: Exception | None) -> None:
                if self.peer is not None and self.peer.transport is not None:
                    self.peer.transport.close()

        class Inbound(Pipe):
            def connection_made(self, transport: Any) -> None:
                super().connection_made(transport)
                transport.pause_reading()
                self.dialing = loop.create_task(self.dial())

            async def dial(self) -> None:
                _, out = await loop.create_connection(Pipe, "127.0.0.1", to_port, ssl=out_ssl)
                assert isinstance(out, Pipe) and self.transport is not None
                self.peer, out.peer = out, self
                self.transport.resume_reading()

        srv = await loop.create_server(Inbound, "127.0.0.1", 0, ssl=in_ssl)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


async def relay_dataplane_main(side: str, to_port: int) -> None:
    from mesh_mcp.dataplane.listener import DataPlaneServer
    from mesh_mcp.dataplane.relay import Relay
    from mesh_mcp.mesh.credentials import Credentials
    from mesh_mcp.mesh.identity import load_or_create

    secret = b"s" * 32
    with tempfile.TemporaryDirectory() as home:
        ident = load_or_create(Path(home))
        creds = Credentials(ident, b"m" * 16, secret, lambda node_id: (secret,))
        if side == "worker":
            server = DataPlaneServer(ident, lambda: creds, "127.0.0.1", 0, targets={"t": to_port})
            port = await server.start()
            print(port, flush=True)
            await asyncio.Event().wait()
        relay = Relay(ident, lambda: creds, f"127.0.0.1:{to_port}", "t")
        print(await relay.start(), flush=True)
        await asyncio.Event().wait()


def relay_main(impl: str, side: str, to_port: int) -> None:
    if os.environ.get("P2_SWITCH_US"):
        sys.setswitchinterval(int(os.environ["P2_SWITCH_US"]) / 1e6)
    if os.environ.get("P2_BUSY"):  # the node's event loop busy with Python work (worst case)

        def spin() -> None:
            while True:
                sum(range(1000))

        threading.Thread(target=spin, daemon=True).start()
    if impl == "dataplane":
        asyncio.run(relay_dataplane_main(side, to_port))
    elif impl.startswith("asyncio"):
        asyncio.run(relay_asyncio_main(side, to_port, impl))
    else:
        relay_threads_main(side, to_port, impl)


C_RELAY = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <pthread.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <sys/socket.h>
struct pr { int a, b; };
static void *pump(void *p) {
  struct pr *x = p; char buf[262144]; ssize_t n;
  while ((n = recv(x->a, buf, sizeof buf, 0)) > 0)
    for (ssize_t o = 0, k; o < n; o += k) if ((k = send(x->b, buf + o, n - o, 0)) <= 0) goto out;
out:
  shutdown(x->a, SHUT_RDWR); shutdown(x->b, SHUT_RDWR); return 0;
}
int main(int c, char **v) {
  int one = 1, s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {0}, b = {0}; socklen_t l = sizeof a;
  a.sin_family = b.sin_family = AF_INET; a.sin_addr.s_addr = b.sin_addr.s_addr = htonl(0x7f000001);
  b.sin_port = htons(atoi(v[1]));
  bind(s, (void *)&a, sizeof a); listen(s, 8); getsockname(s, (void *)&a, &l);
  printf("%d\n", ntohs(a.sin_port)); fflush(stdout);
  for (;;) {
    int cn = accept(s, 0, 0), up = socket(AF_INET, SOCK_STREAM, 0); pthread_t t;
    connect(up, (void *)&b, sizeof b);
    setsockopt(cn, IPPROTO_TCP, TCP_NODELAY, &one, 4); setsockopt(up, IPPROTO_TCP, TCP_NODELAY, &one, 4);
    struct pr *p1 = malloc(sizeof *p1), *p2 = malloc(sizeof *p2);
    p1->a = p2->b = cn; p1->b = p2->a = up;
    pthread_create(&t, 0, pump, p1); pthread_create(&t, 0, pump, p2);
  }
}
"""


def build_c_relay(tmp: str) -> str:
    """A plain-TCP relay in C (two blocking threads per connection): the floor any relay costs here."""
    src, exe = Path(tmp) / "relay.c", str(Path(tmp) / "relay")
    if not Path(exe).exists():
        src.write_text(C_RELAY)
        subprocess.run(["cc", "-O2", "-pthread", "-o", exe, str(src)], check=True)
    return exe


# --- the client (stands in for llama-server) -------------------------------------------------------


class Proc:
    def __init__(self, *args: str, argv: list[str] | None = None) -> None:
        argv = argv or [sys.executable, __file__, *args]
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        assert self.p.stdout is not None
        self.port = int(self.p.stdout.readline())

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()


def ping_batch(sock: socket.socket, size: int, n: int) -> list[float]:
    req = HEAD.pack(GET, 31) + U64.pack(size) + bytes(23)
    assert len(req) == 40
    resp = memoryview(bytearray(8 + size))
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        sock.sendall(req)
        recv_exactly(sock, resp)
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def put(sock: socket.socket, mib: int) -> float:
    chunk = bytes(1 << 20)
    ack = memoryview(bytearray(8))
    t0 = time.perf_counter()
    sock.sendall(HEAD.pack(PUT, mib << 20))
    for _ in range(mib):
        sock.sendall(chunk)
    recv_exactly(sock, ack)
    return (mib << 20) / (time.perf_counter() - t0) / 1e6


def cpu_of(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def llama_main(runs: int, tokens: int) -> None:
    """Real llama.cpp: all of SmolLM2 on one ggml-rpc-server (`-ngl 99`; this llama.cpp offloads the
    output layer first, so each token fetches the logits, 49152×4 bytes, where a split that keeps
    the output layer on the host fetches one hidden state), llama-server connected directly or
    through the two relays (each its own process, as on two machines): load time and tokens/s."""
    import anyio
    import httpx2

    from inference.models import ensure_model
    from inference.paths import cache_dir
    from inference.provision import ensure_llama_cpp
    from tests.harness import free_port

    llama = anyio.run(ensure_llama_cpp)
    model = anyio.run(lambda: ensure_model("SmolLM2-135M-Instruct-Q4_1", models_dir=cache_dir() / "test-models")).path
    rpc_port = free_port()
    rpc = subprocess.Popen(
        [str(llama.rpc_server), "-H", "127.0.0.1", "-p", str(rpc_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)
    worker = Proc("_relay", "dataplane", "worker", str(rpc_port))
    host = Proc("_relay", "dataplane", "host", str(worker.port))
    results: dict[str, list[tuple[float, float]]] = {"direct": [], "relayed": []}
    relay_cpu: list[float] = []  # relay CPU seconds per generated token
    try:
        for _ in range(runs):
            for mode, port in (("direct", rpc_port), ("relayed", host.port)):
                http = free_port()
                t0 = time.perf_counter()
                ls = subprocess.Popen(
                    [
                        str(llama.server), "-m", str(model), "--rpc", f"127.0.0.1:{port}", "-ngl", "99",
                        "--host", "127.0.0.1", "--port", str(http), "-c", "1024", "-np", "1", "--fit", "off",
                        "--no-webui",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
                try:
                    url = f"http://127.0.0.1:{http}"
                    while True:
                        if ls.poll() is not None or time.perf_counter() - t0 > 60:
                            raise SystemExit(f"llama-server ({mode}) did not start: exit {ls.poll()}")
                        try:
                            if httpx2.get(url + "/health", timeout=5).status_code == 200:
                                break
                        except httpx2.TransportError:
                            time.sleep(0.02)
                    load_s = time.perf_counter() - t0
                    speeds = []
                    c0 = cpu_of([worker.p.pid, host.p.pid])
                    for _ in range(3):
                        body = {"prompt": "Once upon a time", "n_predict": tokens, "ignore_eos": True, "temperature": 0}
                        out = httpx2.post(url + "/completion", json=body, timeout=120).json()
                        speeds.append(out["timings"]["predicted_per_second"])
                    if mode == "relayed":
                        relay_cpu.append((cpu_of([worker.p.pid, host.p.pid]) - c0) / (3 * tokens))
                    results[mode].append((load_s, statistics.median(speeds)))
                finally:
                    ls.terminate()
                    ls.wait()
                time.sleep(0.3)
    finally:
        host.stop()
        worker.stop()
        rpc.terminate()
        rpc.wait()
    print(f"load average {os.getloadavg()[0]:.2f}; {runs} interleaved runs, {tokens} tokens, median of 3 per run")
    print("| path | load (to /health 200) | tokens/s | ms per token | relay CPU per token |")
    print("|---|---|---|---|---|")
    for mode, rows in results.items():
        load = statistics.median(r[0] for r in rows)
        tps = statistics.median(r[1] for r in rows)
        cpu = f"{statistics.median(relay_cpu) * 1e3:.2f} ms" if mode == "relayed" else "—"
        print(f"| {mode} | {load:.2f} s | {tps:.1f} | {1000 / tps:.1f} | {cpu} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--pings", type=int, default=400, help="pings per size per round")
    ap.add_argument("--mib", type=int, default=1024, help="MiB per throughput run")
    ap.add_argument("--tput-rounds", type=int, default=3)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--busy", action="store_true", help="relay processes also run a Python thread that never sleeps")
    ap.add_argument("--switch-us", type=int, help="sys.setswitchinterval in the relay processes (default 5000 µs)")
    ap.add_argument("--llama", action="store_true", help="instead: real llama.cpp, direct vs relayed")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    if args.llama:
        llama_main(args.rounds, args.tokens)
        return
    if args.switch_us:
        os.environ["P2_SWITCH_US"] = str(args.switch_us)
    if args.busy:
        os.environ["P2_BUSY"] = "1"
    impls = [i for i in args.impls.split(",") if i]
    sink = Proc("_sink")
    procs = [sink]
    tmp = tempfile.mkdtemp(prefix="p2-")
    ports: dict[str, int] = {"direct": sink.port}
    pids: dict[str, list[int]] = {"direct": []}
    try:
        for impl in impls:
            if impl == "c-threads":
                exe = build_c_relay(tmp)
                worker = Proc(argv=[exe, str(sink.port)])
                host = Proc(argv=[exe, str(worker.port)])
            else:
                worker = Proc("_relay", impl, "worker", str(sink.port))
                host = Proc("_relay", impl, "host", str(worker.port))
            procs += [worker, host]
            ports[impl] = host.port
            pids[impl] = [worker.p.pid, host.p.pid]
        names = ["direct", *impls]
        socks = {name: nodelay(socket.create_connection(("127.0.0.1", port))) for name, port in ports.items()}
        for s in socks.values():
            ping_batch(s, 64, 200)  # warm up: connect, authenticate, page in
        rtt: dict[tuple[str, int], list[float]] = {(n, sz): [] for n in names for sz in SIZES}
        ping_cpu: dict[str, float] = dict.fromkeys(names, 0.0)
        for _ in range(args.rounds):
            for size in SIZES:
                for name in names:
                    c0 = cpu_of(pids[name])
                    rtt[name, size] += ping_batch(socks[name], size, args.pings)
                    ping_cpu[name] += cpu_of(pids[name]) - c0
        tput: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.tput_rounds):
            for name in names:
                c0 = cpu_of(pids[name])
                tput[name].append(put(socks[name], args.mib))
                cpu[name].append(cpu_of(pids[name]) - c0)
        for s in socks.values():
            s.close()
    finally:
        for p in procs:
            p.stop()
    base = {sz: statistics.median(rtt["direct", sz]) for sz in SIZES}
    print(
        f"load average {os.getloadavg()[0]:.2f}; {args.rounds}×{args.pings} pings per size; "
        f"{args.mib} MiB puts; busy={args.busy}"
    )
    print(
        f"| impl | RTT {SIZES[0]} B p50 / p90 | added | RTT {SIZES[1]} B p50 / p90 | added "
        "| relay CPU µs per ping | MB/s (1 MiB writes) | relay CPU s/GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        cells = []
        for sz in SIZES:
            xs = sorted(rtt[name, sz])
            p50, p90 = statistics.median(xs), xs[int(len(xs) * 0.9)]
            cells += [f"{p50:.1f} / {p90:.1f} µs", "—" if name == "direct" else f"+{p50 - base[sz]:.1f} µs"]
        gib = args.mib / 1024
        cpu_cell = "—" if name == "direct" else f"{statistics.median(cpu[name]) / gib:.2f}"
        per_ping = "—" if name == "direct" else f"{ping_cpu[name] / (args.rounds * len(SIZES) * args.pings) * 1e6:.0f}"
        print(f"| {name} | {' | '.join(cells)} | {per_ping} | {statistics.median(tput[name]):.0f} | {cpu_cell} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_sink":
        sink_main()
    elif len(sys.argv) > 1 and sys.argv[1] == "_relay":
        relay_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()

"""Links between real nodes go bad: a partition that heals, and latency on one node's link.

Every node sits behind its own `LinkProxy` (tests/netproxy.py): it binds `NODE_IP:P` and
advertises `LINK_IP`, so its record and invite token say `LINK_IP:P`, where the proxy listens and
forwards to `NODE_IP:P`. Every connection *dialled to* a node therefore crosses that node's link.
Connections a node dials itself leave from a fresh wildcard socket (aioquic binds `[::]:0`) and
cross the dialled peer's link instead, so cutting node A off is: A's own link blackholed, and on
the other links the flows whose client socket belongs to A's process (found through /proc).

The fast tests check the proxy itself against a UDP echo.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import openai
import pytest

from tests.conftest import SMOLLM
from tests.harness import NodeProcess
from tests.netproxy import Address, LinkProxy, TcpLink

Spawn = Callable[..., NodeProcess]
# one llama.cpp thread: three nodes share 2 cores, and oversubscribed llama.cpp threads crawl
SMALL = ("--ctx-size", "512", "--parallel", "1", "--llama-arg=--threads", "--llama-arg=1")

# Addresses of this file only (test_mesh uses 127.0.0.2-7): nodes .21-.23, their links .31-.33.
ECHO_IP, LINK_IP = "127.0.0.41", "127.0.0.42"


# --- the proxy against a UDP echo (fast) ---------------------------------------------------------


@pytest.fixture
def echo() -> Iterator[socket.socket]:
    """A UDP 'server' the test answers by hand (`bounce`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ECHO_IP, 0))
        s.settimeout(2)
        yield s


@pytest.fixture
def link(echo: socket.socket) -> Iterator[LinkProxy]:
    with LinkProxy(listen=(LINK_IP, 0), target=echo.getsockname(), seed=1) as proxy:
        yield proxy


@pytest.fixture
def client() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(2)
        yield s


def to(proxy: LinkProxy) -> Address:
    host, port = proxy.address.rsplit(":", 1)
    return host, int(port)


def bounce(echo: socket.socket) -> Address:
    """Answer one datagram with its own bytes; returns who sent it."""
    data, source = echo.recvfrom(65535)
    echo.sendto(data, source)
    return source


def received(sock: socket.socket, within: float) -> bytes | None:
    sock.settimeout(within)
    try:
        return sock.recv(65535)
    except TimeoutError:
        return None
    finally:
        sock.settimeout(2)


def round_trip(client: socket.socket, echo: socket.socket, proxy: LinkProxy, payload: bytes = b"ping") -> float:
    t0 = time.monotonic()
    client.sendto(payload, to(proxy))
    bounce(echo)
    assert client.recv(65535) == payload
    return time.monotonic() - t0


def test_forwards_both_ways_and_maps_replies_per_client(
    link: LinkProxy, echo: socket.socket, client: socket.socket
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", 0))
        other.settimeout(2)
        client.sendto(b"one", to(link))
        first = bounce(echo)
        other.sendto(b"two", to(link))
        second = bounce(echo)
        assert client.recv(100) == b"one" and other.recv(100) == b"two"
        # one upstream socket per client, on the proxy's host, reused for later datagrams
        assert first != second and first[0] == second[0] == LINK_IP
        client.sendto(b"three", to(link))
        assert bounce(echo) == first and client.recv(100) == b"three"
        assert sorted(link.flows) == sorted([client.getsockname(), other.getsockname()])
    assert link.stats.forwarded == 6 and link.stats.dropped == 0


def test_delay_is_added_each_way(link: LinkProxy, echo: socket.socket, client: socket.socket) -> None:
    base = min(round_trip(client, echo, link) for _ in range(3))
    link.delay_ms = 50
    slow = min(round_trip(client, echo, link) for _ in range(3))
    assert 0.1 <= slow < base + 0.1 + 1.0
    # datagrams sent back to back keep their order
    for i in range(20):
        client.sendto(b"%d" % i, to(link))
    for _ in range(20):
        bounce(echo)
    assert [client.recv(100) for _ in range(20)] == [b"%d" % i for i in range(20)]
    link.delay_ms = 0
    assert min(round_trip(client, echo, link) for _ in range(3)) < 0.5


def test_drop_blackholes_both_directions_and_restore_resumes(
    link: LinkProxy, echo: socket.socket, client: socket.socket
) -> None:
    round_trip(client, echo, link)
    link.drop = True
    client.sendto(b"lost", to(link))
    assert received(echo, 0.3) is None
    # the reverse direction too: the server answers an existing flow, nothing comes back
    link.drop = False
    client.sendto(b"half", to(link))
    source = echo.recvfrom(100)[1]
    link.drop = True
    echo.sendto(b"reply", source)
    assert received(client, 0.3) is None
    assert link.stats.dropped == 2
    link.drop = False
    assert round_trip(client, echo, link, b"back") < 0.5


def test_loss_drops_about_that_share(link: LinkProxy, echo: socket.socket, client: socket.socket) -> None:
    link.loss = 0.5
    for i in range(200):
        client.sendto(b"%d" % i, to(link))
    got = 0
    while received(echo, 0.3) is not None:
        got += 1
    assert 60 <= got <= 140, got
    assert link.stats.forwarded == got and link.stats.dropped == 200 - got
    link.loss = 1.0
    client.sendto(b"x", to(link))
    assert received(echo, 0.2) is None


def test_deny_cuts_only_matching_flows(link: LinkProxy, echo: socket.socket, client: socket.socket) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", 0))
        other.settimeout(2)
        round_trip(client, echo, link)
        cut = client.getsockname()
        link.deny = lambda addr: addr == cut  # an existing flow
        client.sendto(b"no", to(link))
        assert received(echo, 0.3) is None
        round_trip(other, echo, link)  # a new flow that does not match
        link.deny = None
        round_trip(client, echo, link)


def test_close_stops_the_thread_and_frees_the_port(echo: socket.socket) -> None:
    proxy = LinkProxy(listen=(LINK_IP, 0), target=echo.getsockname()).start()
    port = proxy.port
    thread = proxy._thread
    proxy.close()
    assert thread is not None and not thread.is_alive()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LINK_IP, port))


# --- real nodes behind links (slow) --------------------------------------------------------------


WILDCARD = "*"


def _local_address(hex_address: str) -> Address:
    """One /proc/net/udp{,6} `local_address` column: (ip, port); `WILDCARD` for an unspecified ip."""
    host, port = hex_address.rsplit(":", 1)
    raw = bytes.fromhex(host)
    # the kernel prints each 32-bit word in host order (little-endian here)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if not any(words):
        return WILDCARD, int(port, 16)
    if len(words) == 16 and words[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped IPv6
        words = words[12:]
    ip = socket.inet_ntop(socket.AF_INET if len(words) == 4 else socket.AF_INET6, words)
    return ip, int(port, 16)


def udp_addresses(pid: int) -> set[Address]:
    """Local (ip, port) of the UDP sockets process `pid` holds (its fds, looked up in /proc/net/udp*)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # it exited
        return set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addresses = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                cols = line.split()
                if cols[9] in inodes:
                    addresses.add(_local_address(cols[1]))
    return addresses


def from_process(node: NodeProcess) -> Callable[[Address], bool]:
    """Matches the flows whose client socket belongs to `node`'s process: ip and port, since
    nodes on different 127.0.0.x addresses may hold the same port number."""
    assert node.proc is not None
    pid = node.proc.pid

    def match(client: Address) -> bool:
        held = udp_addresses(pid)
        return client in held or (WILDCARD, client[1]) in held

    return match


def test_local_addresses_parse_both_tables() -> None:
    assert _local_address("1500007F:1F90") == ("127.0.0.21", 8080)
    assert _local_address("00000000:0035") == (WILDCARD, 53)
    assert _local_address("00000000000000000000000000000000:0035") == (WILDCARD, 53)
    assert _local_address("0000000000000000FFFF00001500007F:0035") == ("127.0.0.21", 53)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.21", 0))
        assert s.getsockname() in udp_addresses(os.getpid())


@dataclass(frozen=True)
class Linked:
    """A node and the link in front of it."""

    node: NodeProcess
    link: LinkProxy


@pytest.fixture
def links() -> Iterator[list[LinkProxy]]:
    """Links opened by the test, closed after it (request it before `spawn`: nodes stop first)."""
    opened: list[LinkProxy] = []
    yield opened
    for proxy in opened:
        proxy.close()


def linked_node(spawn: Spawn, links: list[LinkProxy], name: str, node_ip: str, link_ip: str, *args: str) -> Linked:
    """Start a node on NODE_IP:P behind a link on LINK_IP:P (same port P: addresses carry it)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((node_ip, 0))
            port = probe.getsockname()[1]
        try:
            proxy = LinkProxy(listen=(link_ip, port), target=(node_ip, port)).start()
        except OSError:
            continue
        links.append(proxy)
        node = spawn("--mesh-host", node_ip, "--bind-port", str(port), "--advertise", link_ip, *args, name=name)
        return Linked(node, proxy)
    raise AssertionError(f"no UDP port free on both {node_ip} and {link_ip}")


def serving(node: NodeProcess) -> set[str]:
    data = httpx2.get(node.api + "/v1/models", timeout=5).json()["data"]
    return {m["id"] for m in data if m["state"] == "serving"}


def wait_serving(nodes: list[NodeProcess], expected: set[str], timeout: float) -> float:
    """Seconds until every node lists exactly `expected` as serving (AssertionError after `timeout`)."""
    t0 = time.monotonic()
    pending = list(nodes)
    while pending:
        pending = [n for n in pending if serving(n) != expected]
        if not pending:
            break
        if time.monotonic() - t0 > timeout:
            got = {n.api: serving(n) for n in pending}
            raise AssertionError(f"not {expected} after {timeout}s: {got}\n{pending[0].log()[-3000:]}")
        time.sleep(0.05)
    return time.monotonic() - t0


def chat(node: NodeProcess) -> tuple[float, str]:
    """Stream one short chat through `node`: (time to first token, text)."""
    client = openai.OpenAI(base_url=node.api + "/v1", api_key="unused", max_retries=0, timeout=30)
    t0 = time.monotonic()
    ttft, text, chunks = 0.0, "", 0
    for chunk in client.chat.completions.create(
        model=SMOLLM, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.monotonic() - t0
            text += chunk.choices[0].delta.content
            chunks += 1
    assert chunks >= 2, "streamed token by token"
    return ttft, text


@pytest.fixture
def mesh(llama: object, smollm: Path, links: list[LinkProxy], spawn: Spawn) -> dict[str, Linked]:
    """A serves SMOLLM; B and C join with A's token. Every node behind its own link."""
    a = linked_node(spawn, links, "a", "127.0.0.21", "127.0.0.31", "--model", SMOLLM, *SMALL)
    a.node.wait_model_state(SMOLLM, "serving", timeout=120)
    token = a.node.wait_for("invite token", lambda s: bool(s.get("invite_token")), timeout=30)["invite_token"]
    b = linked_node(spawn, links, "b", "127.0.0.22", "127.0.0.32", "--join", token)
    c = linked_node(spawn, links, "c", "127.0.0.23", "127.0.0.33", "--join", token)
    for member in (b, c):
        member.node.wait_for("up", lambda s: True, timeout=30)
    wait_serving([b.node, c.node], {SMOLLM}, timeout=30)
    # B and C learn of each other through A's gossip: a test that cuts A off must start after they have
    # (it failed under load when the cut came first: B and C then never meet)
    for member in (a, b, c):
        member.node.wait_for("all three members", lambda s: len(s["peers"]) == 3, timeout=30)
    return {"a": a, "b": b, "c": c}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_latency_on_the_serving_nodes_link_adds_to_time_to_first_token(mesh: dict[str, Linked]) -> None:
    a, c = mesh["a"], mesh["c"]
    chat(c.node)  # warm: the connection, llama-server's first request
    base = min(chat(c.node)[0] for _ in range(3))
    a.link.delay_ms = 50
    forwarded = a.link.stats.forwarded
    delayed = [chat(c.node)[0] for _ in range(3)]
    assert a.link.stats.forwarded > forwarded, "C reaches A through A's link"
    # the request and its first token each cross A's link once: 100 ms at least, whatever the load
    assert min(delayed) >= 0.1 and max(delayed) < 10
    print(
        f"\ntime to first token C->A (best of 3): {base * 1000:.0f} ms; with 50 ms one-way on A's link: "
        f"{min(delayed) * 1000:.0f} ms (+{(min(delayed) - base) * 1000:.0f} ms)"
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_healed_partition_reconverges(mesh: dict[str, Linked]) -> None:
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    # cut A off: its own link, and A's outgoing flows on the others' links (its rejoin dials)
    a.link.drop = True
    b.link.deny = c.link.deny = from_process(a.node)
    t0 = time.monotonic()
    wait_serving([b.node, c.node], set(), timeout=20)
    dropped = time.monotonic() - t0
    # A finds itself alone; it keeps dialling (rejoin), and the partition holds
    a.node.wait_for("alone", lambda s: [p["self"] for p in s["peers"]] == [True], timeout=20)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert serving(b.node) == serving(c.node) == set(), "the partition leaked"
        time.sleep(0.2)
    assert b.link.stats.dropped + c.link.stats.dropped > 0, "A dialled out, and was cut"
    # B and C still form a mesh (a bounded wait: on a loaded machine a heartbeat may stall a moment)
    for one, other in ((b.node, c.node), (c.node, b.node)):
        peer = other.status()["node_id"]
        one.wait_for("B and C see each other", lambda s, p=peer: p in {x["node_id"] for x in s["peers"]}, timeout=10)
    # heal
    a.link.drop = False
    b.link.deny = c.link.deny = None
    t1 = time.monotonic()
    healed = wait_serving([b.node, c.node], {SMOLLM}, timeout=30)
    assert chat(c.node)[1]
    print(
        f"\nB and C dropped A {dropped:.1f}s after the cut; listed it again {healed:.1f}s after the heal "
        f"(chat at {time.monotonic() - t1:.1f}s)"
    )


def test_tcp_link_delays_each_way_and_keeps_order() -> None:
    with socket.create_server((ECHO_IP, 0)) as server:
        with TcpLink(listen=(LINK_IP, 0), target=server.getsockname(), delay_ms=0).start() as link:
            client = socket.create_connection((LINK_IP, link.port), timeout=5)
            conn, _ = server.accept()
            with client, conn:

                def rtt() -> float:
                    t0 = time.monotonic()
                    client.sendall(b"x")
                    conn.sendall(conn.recv(1))
                    assert client.recv(1) == b"x"
                    return time.monotonic() - t0

                base = min(rtt() for _ in range(3))
                link.delay_ms = 30
                slow = min(rtt() for _ in range(3))
                assert 0.06 <= slow < base + 1.0
                payload = bytes(range(256)) * 4096  # 1 MiB in many chunks, order kept
                client.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    got += conn.recv(1 << 16)
                assert got == payload
                client.shutdown(socket.SHUT_WR)
                assert conn.recv(1) == b"", "EOF passes through"

"""Starvation without credentials: floods of connections that never authenticate, on the data plane (idle TCP)
and on QUIC (TLS completed with ALPN mesh-llm/1, then nothing), must not keep members out.

Pure tests of the admission rules (`mesh_mcp/mesh/admission.py`, a fake clock), then real listeners on
loopback flooded from 127.0.0.x addresses other than the legitimate client's (Linux routes all of 127/8 to
lo, and each is a distinct source), and one slow test: a pipeline split re-plans while its worker's data
plane is flooded. Floods are bounded in count and time; every flooding socket is closed in teardown."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import anyio
import pytest
from aioquic.asyncio import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from mesh_mcp.dataplane import limits as dataplane
from mesh_mcp.dataplane.listener import DataPlaneServer
from mesh_mcp.dataplane.services import Stream, connect
from mesh_mcp.mesh import quic
from mesh_mcp.mesh.admission import FULL, PER_SOURCE, Admission, Limits, RefusalLog, source_ip
from mesh_mcp.mesh.credentials import Credentials
from mesh_mcp.mesh.identity import Identity, load_or_create
from mesh_mcp.mesh.quic import MeshTransport
from tests.conftest import SMOLLM
from tests.harness import NodeProcess, free_port, post_served

MESH = b"m" * 16
SECRET = b"s" * 32


def creds(ident: Identity) -> Credentials:
    return Credentials(identity=ident, mesh_id=MESH, secret=SECRET, accepted=lambda node_id: (SECRET,))


def run(fn: Callable[[], Any], limit: float = 180) -> Any:  # a hang fails; a loaded machine does not
    async def main() -> Any:
        with anyio.fail_after(limit):
            return await fn()

    return anyio.run(main)


# --- the rules, pure ------------------------------------------------------------------------------------


LIMITS = Limits(per_source=2, shared=3, reserved=2, deadline_s=5.0)


def test_one_stranger_address_is_held_to_its_share() -> None:
    a: Admission[int] = Admission(LIMITS)
    assert a.admit(1, "10.0.0.9", known=False, now=0) is None
    assert a.admit(2, "10.0.0.9", known=False, now=0) is None
    assert a.admit(3, "10.0.0.9", known=False, now=0) == PER_SOURCE
    assert a.admit(4, "10.0.0.8", known=False, now=0) is None, "another address is not blocked by the first"
    assert a.pending == 3 and a.pending_from("10.0.0.9") == 2
    assert a.admit(1, "10.0.0.9", known=False, now=0) is None and a.pending == 3, "admitting twice is a no-op"


def test_strangers_together_cannot_take_the_members_reserve() -> None:
    a: Admission[int] = Admission(LIMITS)
    for i, ip in enumerate(["10.0.0.1", "10.0.0.2", "10.0.0.3"]):
        assert a.admit(i, ip, known=False, now=0) is None
    assert a.admit(9, "10.0.0.4", known=False, now=0) == FULL
    # a member's address gets in through the reserve, then through the shared pool once that has room
    assert a.admit(10, "192.168.1.5", known=True, now=0) is None
    assert a.admit(11, "192.168.1.5", known=True, now=0) is None
    assert a.pending_reserved == 2
    assert a.admit(12, "192.168.1.5", known=True, now=0) == FULL
    assert a.release(0) and not a.release(0), "release is idempotent"
    assert a.admit(12, "192.168.1.5", known=True, now=0) is None
    assert a.admit(13, "10.0.0.4", known=False, now=0) == FULL


def test_a_member_address_is_not_held_to_a_strangers_share() -> None:
    a: Admission[int] = Admission(Limits(per_source=1, shared=10, reserved=1, deadline_s=5.0))
    assert all(a.admit(i, "192.168.1.5", known=True, now=0) is None for i in range(5))


def test_connections_past_the_deadline_are_handed_back_released() -> None:
    a: Admission[str] = Admission(LIMITS)
    assert a.admit("early", "10.0.0.1", known=False, now=100.0) is None
    assert a.admit("late", "10.0.0.1", known=False, now=103.0) is None
    assert a.overdue(104.9) == []
    assert a.overdue(105.0) == [("early", "10.0.0.1")]
    assert a.pending == 1 and a.pending_from("10.0.0.1") == 1
    a.release("late")  # authenticated in time: never overdue
    assert a.overdue(1000.0) == [] and a.pending == 0


def test_refusals_are_one_line_at_once_then_one_summary_per_interval() -> None:
    log = RefusalLog("data plane: ", interval_s=10)
    first = log.refused("10.0.0.9", "wrong secret", now=0, who="10.0.0.9:5555")
    assert first == "data plane: refused 10.0.0.9:5555: wrong secret"
    lines = [log.refused("10.0.0.9" if i % 4 else f"10.1.{i}.1", PER_SOURCE, now=i / 100) for i in range(1, 1000)]
    assert lines == [None] * 999, "nothing more within the interval"
    summary = log.due(10.0)
    assert summary is not None and "999 more" in summary and "10.0.0.9 (750)" in summary and PER_SOURCE in summary
    assert log.due(11.0) is None
    assert (
        log.refused("10.0.0.9", "x\x1b[2Jy" * 100, now=30)
        == "data plane: refused 10.0.0.9: " + ("x\ufffd[2Jy" * 100)[: RefusalLog.MAX_REASON]
    ), "reasons are cut and shown without control characters"
    # many sources: the summary stays one short line
    for i in range(5000):
        log.refused(f"10.2.{i // 256}.{i % 256}", FULL, now=31)
    summary = log.due(41)
    assert summary is not None and len(summary) < 600 and "5000 more" in summary


def test_source_addresses_compare_as_member_records_write_them() -> None:
    assert source_ip("::ffff:192.168.1.5") == "192.168.1.5"
    assert source_ip("[fe80::1%eth0]") == "fe80::1"
    assert source_ip("127.0.0.1") == "127.0.0.1"


# --- the data plane, flooded with idle TCP connections -------------------------------------------------------


class _Background:
    """A flood running on its own thread from `with` entry to exit (`_run`; `_stop` says when to end)."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        raise NotImplementedError


class Flood(_Background):
    """Idle TCP connections from the given source addresses, opened round-robin at `per_s` in a thread;
    those older than `keep_s` are closed on our side (the server has dropped them by then)."""

    def __init__(self, target: tuple[str, int], sources: list[str], per_s: float = 50, keep_s: float = 8) -> None:
        super().__init__("flood")
        self.target, self.sources, self.per_s, self.keep_s = target, sources, per_s, keep_s
        self.open: deque[tuple[float, socket.socket]] = deque()
        self.opened = 0

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for _, s in self.open:
            s.close()
        self.open.clear()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(1 / self.per_s):  # paces the flood; not a wait for state
            now = time.monotonic()
            while self.open and now - self.open[0][0] > self.keep_s:
                self.open.popleft()[1].close()
            s = socket.socket()
            try:
                s.bind((self.sources[i % len(self.sources)], 0))
                s.settimeout(2)
                s.connect(self.target)
            except OSError:
                s.close()
                continue
            finally:
                i += 1
            self.open.append((now, s))
            self.opened += 1

    def closed_by_server(self) -> int:
        """How many of our open sockets the server has already closed or reset (EOF on a peek)."""
        n = 0
        for _, s in list(self.open):
            try:
                s.setblocking(False)
                if s.recv(1, socket.MSG_PEEK) == b"":
                    n += 1
            except BlockingIOError:
                pass
            except OSError:
                n += 1
        return n


def hello_service(request: dict[str, Any], stream: Stream) -> None:
    stream.send_json({"type": "hello", "peer": stream.peer.node_id})


def legit_calls(host: Identity, port: int, bind_host: str, n: int) -> int:
    """`n` authenticated requests to the worker's data plane, one after another; how many succeeded."""
    ok = 0
    for _ in range(n):
        try:
            with connect(host, lambda: creds(host), f"127.0.0.1:{port}", {"type": "hello"}, bind_host=bind_host) as s:
                ok += s.read_json().get("type") == "hello"
        except Exception as exc:  # counted, and shown if the count is short
            logging.getLogger("test").warning("legit call failed: %s", exc)
        time.sleep(0.1)  # spread over the flood (pacing, not a wait for state)
    return ok


@pytest.mark.parametrize(
    ("flood_from", "legit_from", "known"),
    [
        (["127.0.0.2"], "127.0.0.3", ()),  # one flooding stranger does not block another stranger
        ([f"127.0.0.{i}" for i in range(20, 28)], "127.0.0.1", ("127.0.0.1",)),  # many: the member's reserve
    ],
    ids=["one-source", "many-sources"],
)
def test_a_flooded_data_plane_keeps_serving_members_and_drops_the_idle(
    worker: Identity,
    host: Identity,
    flood_from: list[str],
    legit_from: str,
    known: tuple[str, ...],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        server = DataPlaneServer(worker, lambda: creds(worker), "127.0.0.1", known_sources=lambda: known)
        server.services["hello"] = hello_service
        async with server:
            with Flood(("127.0.0.1", server.port), flood_from, per_s=50) as flood:
                with anyio.fail_after(30):  # the flood is on, past the strangers' pool, before the first legit call
                    while flood.opened < 40:
                        await anyio.sleep(0.02)
                peak = 0

                async def watch() -> None:
                    nonlocal peak
                    while True:
                        peak = max(peak, server.pending)
                        await anyio.sleep(0.01)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    ok = await anyio.to_thread.run_sync(legit_calls, host, server.port, legit_from, 10)
                    tg.cancel_scope.cancel()
                assert ok == 10, caplog.text[-3000:]
                assert peak <= dataplane.PER_SOURCE * len(flood_from) + 1
                assert peak <= dataplane.SHARED + dataplane.RESERVED
                # the idle connections are closed after the deadline: the server's count drops to none
                flood._stop.set()
                with anyio.fail_after(dataplane.HANDSHAKE_TIMEOUT_S + 30):
                    while server.pending:
                        await anyio.sleep(0.05)
                with anyio.fail_after(30):
                    while flood.closed_by_server() < len(flood.open):
                        await anyio.sleep(0.05)

    with caplog.at_level(logging.WARNING, "mesh_llm.dataplane"):
        run(main)
    lines = [r.message for r in caplog.records if r.name == "mesh_llm.dataplane"]
    assert lines and all("refused" in line for line in lines)
    assert len(lines) <= 4, f"refusals are summarised, not one line each: {lines}"


# --- QUIC, flooded with connections that complete TLS and never authenticate -----------------------------


class IdleClient(QuicConnectionProtocol):
    """A stranger: completes TLS with ALPN mesh-llm/1, then opens no stream (some keep the connection alive
    with PINGs); remembers why the server closed it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reason: str | None = None

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self.reason = event.reason_phrase
        super().quic_event_received(event)


async def idle_client(
    port: int, source: str, stack: list[Any], ping: bool, host: str = "127.0.0.1"
) -> IdleClient | None:
    loop = asyncio.get_running_loop()
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[quic.ALPN], idle_timeout=60)
    cfg.verify_mode = ssl.CERT_NONE
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    transport, proto = await loop.create_datagram_endpoint(
        lambda: IdleClient(QuicConnection(configuration=cfg)), sock=sock
    )
    assert isinstance(proto, IdleClient)
    stack.append((transport, proto))
    proto.connect((host, port))
    try:
        with anyio.fail_after(20):
            await proto.wait_connected()
    except (ConnectionError, TimeoutError):
        return None  # refused (over the limits) or not answered
    if ping:

        async def keepalive() -> None:
            with anyio.move_on_after(20):
                while proto.reason is None:
                    with anyio.move_on_after(1):
                        await proto.ping()
                    await anyio.sleep(0.3)

        stack.append(asyncio.get_running_loop().create_task(keepalive()))
    return proto


async def close_all(stack: list[Any]) -> None:
    """Teardown: keep-alive tasks cancelled, every client connection closed, then its socket."""
    for item in stack:
        if isinstance(item, asyncio.Task):
            item.cancel()
    for item in stack:
        if isinstance(item, tuple):
            transport, proto = item
            proto.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await proto.wait_closed()
            transport.close()


def test_quic_strangers_that_never_authenticate_are_closed_and_members_still_connect(tmp_path: Path) -> None:
    async def main() -> None:
        known = ["127.0.0.1:1"]
        server = MeshTransport(
            creds(load_or_create(tmp_path / "a")), {}, host="127.0.0.1", member_addresses=lambda: known
        )
        stranger = MeshTransport(creds(load_or_create(tmp_path / "b")), {}, host="127.0.0.3")
        member = MeshTransport(creds(load_or_create(tmp_path / "c")), {}, host="127.0.0.1")
        stack: list[Any] = []
        try:
            async with anyio.create_task_group() as tg:
                port = await tg.start(server.run)
                await tg.start(stranger.run)
                await tg.start(member.run)
                peak = 0

                async def watch() -> None:
                    nonlocal peak
                    while True:
                        peak = max(peak, server.pending)
                        await anyio.sleep(0.005)

                tg.start_soon(watch)
                # 24 TLS-complete idle connections at once from one address (three times its share), half pinging
                results = await asyncio.gather(
                    *(idle_client(port, "127.0.0.2", stack, ping=i % 2 == 0) for i in range(24))
                )
                idle = [c for c in results if c is not None]
                assert 1 <= len(idle) < 24, "some connected, the rest were refused"
                assert server.admission.pending_from("127.0.0.2") <= quic.PENDING_LIMITS.per_source
                # while they sit there, another stranger's address and a member both get in and authenticate
                conn = await stranger.connect(f"127.0.0.1:{port}")
                assert conn.peer is not None and conn.peer.node_id == server.creds.identity.node_id
                conn = await member.connect(f"127.0.0.1:{port}")
                assert conn.peer is not None
                # the idle ones are closed, with a reason, by the deadline from their creation (pings or not)
                with anyio.fail_after(quic.AUTH_DEADLINE_S + 30):
                    while any(c.reason is None for c in idle):
                        await anyio.sleep(0.05)
                assert all("authenticate" in (c.reason or "") for c in idle), [c.reason for c in idle]
                assert peak <= quic.PENDING_LIMITS.per_source + 2  # the flood's share, plus the two that authenticated
                # and aioquic's state for them is gone: only the two authenticated connections remain
                assert server._server is not None
                with anyio.fail_after(30):
                    while len(set(server._server._protocols.values())) > 2:
                        await anyio.sleep(0.05)
                assert server.pending == 0 and len(server.connections) == 2
                tg.cancel_scope.cancel()
        finally:
            await close_all(stack)

    run(main)


def test_a_quic_refusal_over_the_limit_says_why(tmp_path: Path) -> None:
    async def main() -> None:
        server = MeshTransport(creds(load_or_create(tmp_path / "a")), {}, host="127.0.0.1")
        server.admission = Admission(Limits(per_source=1, shared=1, reserved=0, deadline_s=30))
        other = MeshTransport(creds(load_or_create(tmp_path / "b")), {}, host="127.0.0.3")
        stack: list[Any] = []
        try:
            async with anyio.create_task_group() as tg:
                port = await tg.start(server.run)
                await tg.start(other.run)
                assert await idle_client(port, "127.0.0.2", stack, ping=False) is not None
                with pytest.raises(OSError, match="refused: every slot"):
                    await other.connect(f"127.0.0.1:{port}")
                tg.cancel_scope.cancel()
        finally:
            await close_all(stack)

    run(main)


# --- a pipeline split re-plans while its worker's data plane and QUIC port are flooded ---------------------


class QuicFlood(_Background):
    """Strangers' QUIC connections (TLS done, never authenticated, every other one kept alive with PINGs) opened
    at `per_s` from `sources` on a thread with its own event loop; all closed on exit."""

    def __init__(self, host: str, port: int, sources: list[str], per_s: float = 20) -> None:
        super().__init__("quic-flood")
        self.host, self.port, self.sources, self.per_s = host, port, sources, per_s
        self.tried = self.completed = 0

    def _run(self) -> None:
        asyncio.run(self._flood())

    async def _flood(self) -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)  # refused clients' futures
        stack: list[Any] = []

        async def one(i: int) -> None:
            source = self.sources[i % len(self.sources)]
            if await idle_client(self.port, source, stack, ping=i % 2 == 0, host=self.host):
                self.completed += 1

        try:
            async with anyio.create_task_group() as tg:
                while not self._stop.is_set():
                    tg.start_soon(one, self.tried)
                    self.tried += 1
                    await anyio.sleep(1 / self.per_s)  # paces the flood; not a wait for state
                tg.cancel_scope.cancel()
        finally:
            await close_all(stack)


def _llama_server_pid(node: NodeProcess) -> int | None:
    """The node's split llama-server (`--rpc`): a child of the node's process."""
    assert node.proc is not None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) != node.proc.pid:
                continue
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(c.endswith(b"llama-server") for c in cmd) and b"--rpc" in cmd:
            return int(pid)
    return None


@pytest.mark.slow
def test_a_split_re_plans_while_its_workers_data_plane_is_flooded(spawn: Callable[..., NodeProcess]) -> None:
    host = spawn("--mesh-host", "127.0.0.2", "--model", SMOLLM, "--split", "2", "--name", "host", name="host")
    token = host.wait_for("token", lambda s: bool(s.get("invite_token")), timeout=60)["invite_token"]
    port = free_port("127.0.0.3")
    worker = spawn("--mesh-host", "127.0.0.3", "--bind-port", str(port), "--join", token, "--name", "w1", name="w1")
    worker.wait_log(rf"RPC data plane listening on TCP {port}\b", timeout=60)
    host.wait_model_state(SMOLLM, "serving", timeout=240)
    before = host.log().count("split of")
    pid = _llama_server_pid(host)
    assert pid is not None
    # strangers at 8 addresses, 50 idle TCP connections a second to the data plane, more than the strangers' pool
    # holds, and 20 QUIC connections a second from 8 more that complete TLS and never authenticate
    quic_sources = [f"127.0.0.{i}" for i in range(30, 38)]
    with (
        Flood(("127.0.0.3", port), [f"127.0.0.{i}" for i in range(20, 28)], per_s=50) as flood,
        QuicFlood("127.0.0.3", port, quic_sources) as quic_flood,
    ):
        deadline = time.monotonic() + 30  # both floods are on before the re-plan starts
        while flood.opened < 50 or quic_flood.completed < 10:
            assert time.monotonic() < deadline, f"floods did not start: {flood.opened} TCP, {quic_flood.completed} QUIC"
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)  # the split's llama-server dies: the host tears the group down and re-plans
        host.wait_log(r"llama-server for .*re-planning", timeout=30)
        host.wait_for(
            "serving again after the re-plan",
            lambda s: (
                (m := host.model(s, SMOLLM)) is not None
                and m["state"] == "serving"
                and (p := _llama_server_pid(host)) is not None
                and p != pid
            ),
            timeout=180,
        )
        r = post_served(host.api + "/v1/completions", {"model": SMOLLM, "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text
    failures = re.findall(r"split of .* failed: .*", host.log())
    assert host.log().count("split of") - before == 1 and not failures, failures  # "ended ...; planning again" once
    refusals = [line for line in worker.log().splitlines() if "data plane: refused" in line]
    assert refusals and len(refusals) <= 2 + flood.opened // 50 // 10 + 2, refusals[-5:]

"""Dead peers are acted on, not waited on; a client hanging up cancels the generation wherever it runs.

Real node processes on loopback addresses (issue 12, item 7). Before: a stream from a killed node stalled
20 s (QUIC's idle timeout) before its error event, a request sent just after the kill hung 19 s before its
503, a split worker's rpc-server stayed held 20 s after its host died, and a client hanging up on node B
left node A (which B had tunnelled the request to) decoding to max_tokens. Membership declares a killed
node dead in about 4 s; everything here must end within a bounded wait well under the old 20 s.
The mechanisms themselves (a tunnelled request abandoned before or after its head, a connection aborted)
are also checked in one process on real QUIC connections, fast.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from starlette.types import Receive, Scope, Send

from mesh_mcp.mesh import tunnel
from mesh_mcp.mesh.credentials import Credentials
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.mesh.quic import Connection, MeshTransport
from tests.conftest import SMOLLM
from tests.harness import NodeProcess, pid_alive
from tests.test_mesh import mesh_node, token_of, wait_models

Spawn = Callable[..., NodeProcess]
OLD_STALL_S = 20.0  # QUIC's idle timeout: what everything waited for before


class LogWatch:
    """Records when a node's log first matches a pattern (a background poll every 50 ms)."""

    def __init__(self, node: NodeProcess, pattern: str) -> None:
        self.node, self.pattern = node, re.compile(pattern)
        self.at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.pattern.search(self.node.log()):
                self.at = time.monotonic()
                return
            self._stop.wait(0.05)

    def result(self, timeout: float) -> float | None:
        """When the log first matched (waiting up to `timeout` for it); None if it never did."""
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(5)
        return self.at


def kill_node(node: NodeProcess) -> float:
    """kill -9 the node and its llama.cpp children; the moment it happened."""
    assert node.proc is not None
    os.killpg(node.proc.pid, signal.SIGKILL)
    return time.monotonic()


def serving_pair(spawn: Spawn, *server_args: str) -> tuple[NodeProcess, NodeProcess]:
    """Node A serves SmolLM2; node B is a --client that routes to it."""
    a = mesh_node(spawn, "a", "127.0.0.2", "--model", SMOLLM, *server_args)
    a.wait_model_state(SMOLLM, "serving", timeout=180)
    b = mesh_node(spawn, "b", "127.0.0.3", "--client", "--join", token_of(a))
    b.wait_for("up", lambda s: True, timeout=30)
    wait_models(b, {SMOLLM}, timeout=20)
    return a, b


def long_generation(max_tokens: int) -> dict[str, object]:
    return {
        "model": SMOLLM,
        "prompt": "Count from one to ten thousand:",
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,  # llama-server's extension: generate to max_tokens
    }


@pytest.mark.slow
def test_killed_server_ends_streams_and_requests_soon_after_it_is_declared_dead(llama: object, spawn: Spawn) -> None:
    a, b = serving_pair(spawn, "--ctx-size", "4096", "--parallel", "2")
    a_id = a.status()["node_id"]
    declared = LogWatch(b, rf"member {a_id} \(.*\) died")
    with ThreadPoolExecutor(1) as pool:
        with httpx2.stream("POST", b.api + "/v1/completions", json=long_generation(3000), timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert any(line.startswith("data:") for line in lines), "tokens are streaming"
            killed = kill_node(a)

            def request_after_kill() -> tuple[int, str, float]:
                body = {"model": SMOLLM, "prompt": "Hello", "max_tokens": 4}
                resp = httpx2.post(b.api + "/v1/completions", json=body, timeout=60)
                return resp.status_code, resp.text, time.monotonic()

            late = pool.submit(request_after_kill)
            rest = "\n".join(lines)  # ends when B fails the stream
            stream_ended = time.monotonic()
        status, text, answered = late.result(timeout=60)
    declared_at = declared.result(timeout=30)
    stream_s, request_s = stream_ended - killed, answered - killed
    print(
        f"\nkill -9 → B declares A dead: {declared_at - killed if declared_at else float('nan'):.2f} s; "
        f"→ stream's error event: {stream_s:.2f} s; → 503 for the request sent after the kill: {request_s:.2f} s"
    )
    assert '"error"' in rest, f"the stream ends with an error event, not silently: {rest[-500:]}"
    # acted on by the declaration, with A's connection still open (QUIC's idle timeout would have closed it first)
    assert re.search(rf"member {a_id} died: closed [1-9]\d* connection", b.log()), b.log()[-3000:]
    assert stream_s < OLD_STALL_S, f"the stream ended {stream_s:.1f} s after the kill"  # loose: not the idle stall
    assert status == 503 and "no server of this model answered" in text, (status, text)
    assert declared_at is not None, "B logged the death"


def _llama_port(pid: int) -> int:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(args[args.index(b"--port") + 1])


def _metric(base: str, name: str) -> float:
    text = httpx2.get(base + "/metrics", timeout=10).text
    found = re.search(rf"^llamacpp:{name} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"no {name} in {base}/metrics"
    return float(found.group(1))


@pytest.mark.slow
def test_client_hanging_up_on_b_stops_the_generation_on_a(llama: object, spawn: Spawn) -> None:
    max_tokens = 4000  # ~35 s of decoding here: without the cancel A runs on to max_tokens
    a, b = serving_pair(spawn, "--ctx-size", "4608", "--parallel", "1")
    pid = a.model(a.status(), SMOLLM)["pid"]  # type: ignore[index]
    upstream = f"http://127.0.0.1:{_llama_port(pid)}"  # A's llama-server (--metrics)
    before = _metric(upstream, "n_decode_total")
    with httpx2.stream("POST", b.api + "/v1/completions", json=long_generation(max_tokens), timeout=60) as r:
        assert r.status_code == 200 and r.headers.get("x-mesh-node") == a.status()["node_id"], "tunnelled to A"
        # Hold the line iterator: a `for ... break` over r.iter_lines() drops it, and its finalizer closes the
        # connection — a hang-up before the check below (seen under load: A had stopped after 7 tokens).
        lines = r.iter_lines()
        chunks = 0
        while chunks < 5:
            chunks += next(lines).startswith("data:")
        assert _metric(upstream, "requests_processing") == 1, "A is generating"
    hung_up = time.monotonic()  # leaving the block closed the client's connection mid-stream
    deadline = hung_up + 30
    while _metric(upstream, "requests_processing") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped_s = time.monotonic() - hung_up
    decoded = _metric(upstream, "n_decode_total") - before
    print(f"\nclient hung up on B → A's llama-server idle after {stopped_s:.2f} s ({decoded:.0f}/{max_tokens} decoded)")
    assert _metric(upstream, "requests_processing") == 0, f"A still generating {stopped_s:.0f} s after the hang-up"
    assert decoded < max_tokens / 2, f"A decoded {decoded:.0f} tokens: the generation was not cancelled"
    # and A decodes nothing more afterwards
    settled = _metric(upstream, "n_decode_total")
    assert _metric(upstream, "requests_processing") == 0 and _metric(upstream, "n_decode_total") == settled


@pytest.mark.slow
def test_split_workers_rpc_server_is_released_when_its_host_is_killed(llama: object, spawn: Spawn) -> None:
    host = spawn("--mesh-host", "127.0.0.2", "--model", SMOLLM, "--split", "2", "--name", "host", name="host")
    token = token_of(host)
    worker = spawn("--mesh-host", "127.0.0.3", "--join", token, "--name", "w1", name="w1")
    host.wait_model_state(SMOLLM, "serving", timeout=240)
    rpc_pid = int(worker.wait_log(r"started rpc-server pid (\d+)", timeout=30).group(1))
    assert pid_alive(rpc_pid)
    host_id = host.status()["node_id"]
    declared = LogWatch(worker, rf"member {host_id} \(.*\) died")
    killed = kill_node(host)
    deadline = killed + 30
    while pid_alive(rpc_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    released_s = time.monotonic() - killed
    declared_at = declared.result(timeout=30)
    print(
        f"\nkill -9 the split host → worker declares it dead: "
        f"{declared_at - killed if declared_at else float('nan'):.2f} s; rpc-server gone: {released_s:.2f} s"
    )
    assert not pid_alive(rpc_pid), f"the worker's rpc-server still runs {released_s:.0f} s after its host died"
    worker.wait_log(r"split \S+: its host was declared dead; rpc-server stopped", timeout=30)
    assert worker.proc is not None and worker.proc.poll() is None, "the worker itself keeps running"


# ------------------------------------------------------------------ the mechanisms, in one process


class Generator:
    """An ASGI app that streams forever (after `delay_head`, like prompt processing) and records its end."""

    def __init__(self, delay_head: bool = False) -> None:
        self.delay_head = delay_head
        self.started = anyio.Event()
        self.ended = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.started.set()
        try:
            if self.delay_head:
                await anyio.sleep_forever()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            while True:
                await send({"type": "http.response.body", "body": b"token ", "more_body": True})
                await anyio.sleep(0.01)
        finally:
            self.ended.set()


async def _pair(tmp_path: Path, tg: Any, app: Any) -> tuple[Connection, MeshTransport, MeshTransport]:
    secret = b"s" * 32

    def creds(name: str) -> Credentials:
        return Credentials(load_or_create(tmp_path / name), b"m" * 16, secret, lambda _: (secret,))

    async def on_http(
        conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await tunnel.serve(app, conn, header, reader, writer)

    async def hang(
        conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await anyio.sleep_forever()

    server = MeshTransport(creds("a"), {"http": on_http, "hang": hang}, host="127.0.0.1")
    client = MeshTransport(creds("b"), {}, host="127.0.0.1")
    port = await tg.start(server.run)
    await tg.start(client.run)
    return await client.connect(f"127.0.0.1:{port}"), client, server


def _run(fn: Callable[[], Any]) -> None:
    async def main() -> None:
        with anyio.fail_after(30):
            await fn()

    anyio.run(main)


def test_a_requester_abandoning_a_streamed_response_cancels_the_serving_app(tmp_path: Path) -> None:
    """Regression: after the request's FIN a RESET_STREAM tells the server nothing; STOP_SENDING does."""
    app = Generator()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            conn, _, _ = await _pair(tmp_path, tg, app)
            resp = await tunnel.request(conn, "POST", "/v1/completions", [], b"{}")
            got = 0
            async for _ in resp.chunks():
                got += 1
                if got == 3:
                    break
            await resp.aclose()  # what the proxy does when its client hangs up
            with anyio.fail_after(30):
                await app.ended.wait()
            tg.cancel_scope.cancel()

    _run(main)


def test_a_requester_cancelled_before_the_head_cancels_the_serving_app(tmp_path: Path) -> None:
    """The client hangs up during prompt processing: nothing was answered yet, the server must still stop."""
    app = Generator(delay_head=True)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            conn, _, _ = await _pair(tmp_path, tg, app)
            with anyio.CancelScope() as scope:
                tg.start_soon(_cancel_when_started, app, scope)
                await tunnel.request(conn, "POST", "/v1/completions", [], b"{}")
            assert scope.cancel_called
            with anyio.fail_after(30):
                await app.ended.wait()
            tg.cancel_scope.cancel()

    _run(main)


async def _cancel_when_started(app: Generator, scope: anyio.CancelScope) -> None:
    await app.started.wait()
    scope.cancel()


def test_an_aborted_connection_fails_its_streams_at_once_on_both_sides(tmp_path: Path) -> None:
    """What a member declared dead gets: no closing period, no idle timeout; every stream fails now."""

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            conn, client, server = await _pair(tmp_path, tg, Generator())
            reader, _ = await conn.open_stream({"t": "hang"})
            assert conn.peer is not None
            server_id, client_id = conn.peer.node_id, client.creds.identity.node_id
            conn.abort("member died")
            with anyio.fail_after(10), pytest.raises(ConnectionResetError, match="member died"):
                await reader.read(1)
            assert client.connection(server_id) is None, "forgotten at once: the next dial is a fresh one"
            with anyio.fail_after(30):  # the peer hears the CONNECTION_CLOSE; our dialled socket is released
                while server.connection(client_id) is not None or client._cleanups:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()

    _run(main)


def test_a_member_declared_dead_that_still_answers_keeps_its_streams(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On a loaded machine gossip can declare a live node dead; its connection is cut only once it also fails to
    answer a ping on it (CONFIRM_S), so a slow heartbeat does not become failed requests. Once it really goes
    silent, it is acted on."""
    from mesh_mcp.mesh import meshfile, runtime, tokens
    from mesh_mcp.state import NodeState

    def node(name: str, config: Any, settings: runtime.MeshSettings) -> runtime.Mesh:
        ident = load_or_create(tmp_path / name)
        state = NodeState(node_id=ident.node_id, name=name, version="0", api_url="", console_url="")
        return runtime.Mesh(ident, config, tmp_path / name, state, settings)

    async def main() -> None:
        owner = load_or_create(tmp_path / "a").public_bytes
        a = node("a", meshfile.create(owner=owner), runtime.MeshSettings(host="127.0.0.1"))
        async with anyio.create_task_group() as tg:
            await tg.start(a.run)
            token = tokens.decode(a.invite_token())
            b = node(
                "b", meshfile.from_token(token), runtime.MeshSettings(role="client", host="127.0.0.1", joins=(token,))
            )
            await tg.start(b.run)
            a_id = a.identity.node_id
            with anyio.fail_after(30):
                while (conn := b.transport.connection(a_id)) is None:
                    await anyio.sleep(0.05)
            b.is_gone = lambda node_id: node_id == a_id  # type: ignore[method-assign]  # membership says: dead
            b._gone(a_id, "died")
            with anyio.fail_after(30):
                while "declared dead but answers on its connection" not in caplog.text:
                    await anyio.sleep(0.05)
            assert not conn.closed_event.is_set() and b.transport.connection(a_id) is conn
            # now A goes silent for real (its socket stops reading): the next ping fails and B acts
            server = a.transport._server
            assert server is not None and server._transport is not None
            server._transport.pause_reading()  # type: ignore[attr-defined]
            with anyio.fail_after(30):
                await conn.closed_event.wait()
            assert f"member {a_id} died: closed 1 connection(s)" in caplog.text
            server._transport.resume_reading()  # type: ignore[attr-defined]
            tg.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, "mesh_llm.mesh"):
        anyio.run(main)


def test_a_peer_that_cannot_be_reached_is_one_error(tmp_path: Path) -> None:
    """`Mesh.reach` to a node with no known address is `PeerUnreachable` saying why (also an OSError, as network
    failures are); nothing else leaks out."""
    from mesh_mcp.errors import PeerUnreachable
    from mesh_mcp.mesh import meshfile, runtime
    from mesh_mcp.state import NodeState

    ident = load_or_create(tmp_path / "a")
    state = NodeState(node_id=ident.node_id, name="a", version="0", api_url="", console_url="")
    mesh = runtime.Mesh(
        ident, meshfile.create(owner=ident.public_bytes), tmp_path / "a", state, runtime.MeshSettings(host="127.0.0.1")
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(mesh.run)
            with pytest.raises(PeerUnreachable, match="no address to dial") as unknown:
                await mesh.reach("0123456789abcdef")
            assert isinstance(unknown.value, OSError)
            tg.cancel_scope.cancel()

    anyio.run(main)

"""The proxy: a raw ASGI endpoint forwarding one API path to a server of the model a request names — this node's
llama-server or, through the `Directory`, another node of the mesh — best server first, the next one when a server
fails before answering.

Raw ASGI so that it (a) streams upstream bytes as they arrive, with no buffering, (b) watches for the client going
away from the first byte on and cancels the upstream request (llama-server then stops generating), and (c) never
lets bad input reach llama-server: oversized bodies get 413, malformed or too deeply nested JSON 400 (`jsonlimits`),
unknown models 404 (listing what is served), a model still loading 503 with Retry-After, requests the official APIs
refuse 400 naming the field (`checks`). Those answers are `HttpError`s raised here and shaped by the app's one
boundary (`app.build_api`); where llama-server's answers differ from the official APIs' (Anthropic ids and stop
sequences, context overflows, error shapes) they are rewritten on the way (`rewrite`). Streams are relayed whole
event by whole event; one that breaks off after its head goes on on another server of the model from the text
already sent (`resume`; `_go_on`), else ends with the API's in-stream error event. A whole answer that breaks off
before its head went on is asked again of the next server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from mesh_mcp.api import auto, reasoning, resume
from mesh_mcp.api import rewrite as api_rewrite
from mesh_mcp.api.checks import Flavor, ModelFacts, Rejection, check_model_field, check_request
from mesh_mcp.api.directory import Directory, RemoteModel
from mesh_mcp.api.errors import HttpError, sse_error_event
from mesh_mcp.api.router import Candidate, match_model, ranked, session_key
from mesh_mcp.api.upstream import Pool, request
from mesh_mcp.errors import UpstreamBroken, UpstreamUnavailable
from mesh_mcp.jsonlimits import JsonRejected, parse_object
from mesh_mcp.mesh.tunnel import HOP_HEADER
from mesh_mcp.metrics import NodeMetrics, Trace, metrics_of
from mesh_mcp.metrics.sse import MAX_PARSED
from mesh_mcp.response import Response
from mesh_mcp.state import SERVING, ModelStatus, NodeState

log = logging.getLogger("mesh_llm.api")

RETRY_AFTER_S = 5
# A request named this model (served or not): the node's demand map counts it. For a model no node serves, it may
# answer why the mesh expects to serve it soon (a standby may promote itself): the request gets a 503, not a 404.
OnDemand = Callable[[str, bool], str | None]  # (model, some node serves it)
MAX_ERROR_BODY = 64 << 10
SERVED_BY = b"x-mesh-node"  # response header: the node whose llama-server answered
MODEL_HEADER = b"x-mesh-model"  # response header: the model that answered (the one `auto` chose, api/auto.py)
# A non-streamed answer read before its head is sent, so that its Server-Timing can carry llama-server's prompt and
# queue times; a longer one (embeddings of a large batch) goes on without them.
PREFETCH_BYTES = MAX_PARSED
# A stream that broke off goes on on another server (api/resume.py): at most this many times per request, and while
# the mesh says a server is coming (a split re-placed, a standby promoting), waiting this long for one; a comment
# line every NOTE_EVERY_S keeps the client's connection (and its read timeout) alive meanwhile.
MAX_FAILOVERS = 4
FAILOVER_WAIT_S = 90.0
NOTE_EVERY_S = 5.0
# Headers that describe one hop, never forwarded.
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"server", b"date", b"te", b"trailer", b"upgrade"}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = HttpError(413, f"request body exceeds {limit} bytes", "request_too_large")
    if declared is not None:
        if not declared.isdigit():
            raise HttpError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def _parse_payload(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object within `jsonlimits`' bounds (depth, string size), with a usable `model`."""
    try:
        payload = parse_object(body)
    except JsonRejected as exc:
        raise HttpError(400, str(exc)) from exc
    if (bad := check_model_field(payload)) is not None:
        raise _rejected(bad)
    return payload


def _rejected(rejection: Rejection) -> HttpError:
    return HttpError(rejection.status, rejection.message, rejection.code, param=rejection.param)


class _NothingSent(Exception):
    """A whole (not streamed) answer broke off before anything of it was sent: it can be asked again."""


@dataclass(frozen=True)
class _Ask:
    """One request as routing resolved it: what a continuation on another server needs."""

    name: str
    payload: dict[str, Any]
    routed: bool  # from another node: this node serves it locally, the entry node goes on elsewhere
    target: str
    headers: list[tuple[bytes, bytes]]
    stops: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    node_id: str
    base_url: str | None  # local llama-server; None for a remote node


class Proxy:
    """ASGI endpoint forwarding one API path to a server of the requested model: the local
    llama-server or, through the directory, another node of the mesh."""

    def __init__(
        self,
        node: NodeState,
        directory: Directory,
        pool: Pool,
        path: str,
        flavor: Flavor,
        max_body: int,
        on_demand: OnDemand | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.node, self.directory, self.pool = node, directory, pool
        self.path, self.flavor, self.max_body = path, flavor, max_body
        self.on_demand = on_demand
        self.metrics = metrics if metrics is not None else metrics_of(node)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one request; it is counted in the node's metrics (`metrics.Trace`) however it ends."""
        trace = Trace(self.metrics, self.node.node_id)
        try:
            await self._call(scope, receive, send, trace)
        except HttpError as exc:
            trace.failed(exc.status)
            raise
        finally:
            trace.close()

    async def _call(self, scope: Scope, receive: Receive, send: Send, trace: Trace) -> None:
        request = Request(scope, receive)
        routed = request.headers.get(HOP_HEADER.decode()) is not None  # from another node: serve locally only
        body = await _read_body(request, self.max_body)
        payload = _parse_payload(body)
        requested = payload.get("model")
        thinking = reasoning.read(payload, self.path)
        if isinstance(thinking, Rejection):
            raise _rejected(thinking)
        want = auto.request_facts(payload, len(body), self.path, thinking.on) if auto.is_auto(requested) else None
        name, routes, facts = self._routes(requested, routed, session_key(payload), want)
        # One thinking control, as llama-server reads it; a request that says nothing gets the servers' default (off)
        changed = thinking.asked and reasoning.apply(payload, self.path, thinking)
        if want is not None:  # llama-server, a peer and the response's `model` see the model chosen
            payload["model"] = name
        if changed or want is not None:
            body = json.dumps(payload).encode()
        send = _naming(send, name)
        if (rejection := check_request(payload, self.flavor, self.path, facts)) is not None:
            raise _rejected(rejection)
        asked = payload.get("stop_sequences")
        stops = tuple(s for s in asked if isinstance(s, str)) if isinstance(asked, list) else ()
        query = scope.get("query_string") or b""
        target = self.path + ("?" + query.decode("latin-1") if query else "")
        headers = [(b"content-type", b"application/json")]
        if accept := request.headers.get("accept"):
            headers.append((b"accept", accept.encode("latin-1")))
        trace.routed(name, routed)
        self._count(name, +1)
        started = time.perf_counter()
        try:
            ask = _Ask(name, payload, routed, target, headers, stops)
            await self._forward(routes, ask, body, receive, send, trace)
        finally:
            self._count(name, -1)
            log.debug("%s %s in %.1f ms", self.path, name, 1e3 * (time.perf_counter() - started))

    def _count(self, name: str, delta: int) -> None:
        status = self.node.models.get(name)
        if status is not None:
            self.node.models[name] = replace(status, in_flight=max(0, status.in_flight + delta))

    def _wanted(self, name: str, served: bool) -> str | None:
        """Tell the demand map a request named `name`; why the mesh expects to serve it soon, if it does. Its
        failure never fails the request."""
        if self.on_demand is None:
            return None
        try:
            return self.on_demand(name, served)
        except Exception:  # a bug in the demand map: logged, the request goes on
            log.exception("counting a request for %r as demand failed", name[:128])
            return None

    def _routes(
        self, requested: str | None, routed: bool, session: str | None, want: auto.RequestFacts | None = None
    ) -> tuple[str, list[Target], ModelFacts]:
        """The model's name, its servers (best first) and what they know of it; or the `HttpError` to answer.
        `want`: the request leaves the model to the mesh (`auto.is_auto`) and needs this of it."""
        remote = [] if routed else self.directory.remote_models()
        names = self.node.served_names() + sorted({r.name for r in remote} - set(self.node.served_names()))
        name: str | None
        if want is not None:
            name = self._auto(want, remote, names)
            requested = name
        else:
            name = match_model(requested, names)
        expected = None
        if isinstance(requested, str) and requested:
            # Counted where it entered the mesh and, when tunnelled, where it is served: views merge by max, so
            # the same requests seen twice do not add up, and a client's requests (clients publish no record)
            # still reach the mesh's demand through the node that served them.
            expected = self._wanted(name or requested, name is not None)
        if name is None and expected and not routed:
            msg = f"model '{requested}' is not served right now: {expected}; retry in {RETRY_AFTER_S}s"
            raise HttpError(503, msg, "model_loading", headers={"Retry-After": str(RETRY_AFTER_S)})
        if name is None:
            msg = (
                f"model '{requested}' is not served by this mesh; available: {', '.join(names)}"
                if names
                else f"model '{requested}' is not served: no node of this mesh serves a model yet"
            )
            raise HttpError(404, msg, "model_not_found", available=names)
        local = self.node.models.get(name)
        if local is not None and local.state == "stopped":
            local = None
        if local is not None and self.path.endswith("/embeddings") and not local.embeddings:
            raise HttpError(400, f"model '{name}' is a generation model and does not serve embeddings")
        candidates: dict[str, Target] = {}
        pool: list[Candidate] = []
        if local is not None and local.state == SERVING and local.upstream is not None:
            candidates[self.node.node_id] = Target(self.node.node_id, local.upstream)
            pool.append(Candidate(self.node.node_id, local.in_flight, local=True))
        for r in remote:
            if r.name == name and r.state == SERVING and r.node_id not in candidates:
                candidates[r.node_id] = Target(r.node_id, None)
                pool.append(Candidate(r.node_id, r.in_flight))
        if candidates:
            facts = _facts(name, local, [r for r in remote if r.name == name and r.node_id in candidates])
            return name, [candidates[c.node_id] for c in ranked(pool, session)], facts
        if local is not None and local.state == "failed":
            raise HttpError(503, f"model '{name}' failed to start: {local.detail}", "model_failed")
        state = local.state if local is not None else "loading"
        loaders = sorted({r.node_id for r in remote if r.name == name and r.state in ("downloading", "loading")})
        where = f" on node {', '.join(loaders[:3])}" if local is None and loaders else ""
        msg = f"model '{name}' is {state}{where}; retry in {RETRY_AFTER_S}s"
        raise HttpError(503, msg, "model_loading", headers={"Retry-After": str(RETRY_AFTER_S)})

    def _auto(self, want: auto.RequestFacts, remote: list[RemoteModel], names: list[str]) -> str:
        """The model `auto` picks among those serving (`auto.choose_auto`); with none serving yet, the first listed
        (it answers the 503 of a model loading or failed), and a 404 when the mesh lists none."""
        chosen = auto.choose_auto(want, auto.merge(self.node.models.values(), remote))
        if chosen is not None or names:
            return chosen or names[0]
        msg = "no model to choose for 'auto': no node of this mesh serves a model yet"
        raise HttpError(404, msg, "model_not_found", available=[])

    async def _open(self, route: Target, target: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> Response:
        if route.base_url is None:
            return await self.directory.open(route.node_id, "POST", target, headers, body)
        url = urlsplit(route.base_url)
        return await request(self.pool, url.hostname or "127.0.0.1", url.port or 80, "POST", target, body, headers)

    async def _forward(
        self, routes: list[Target], ask: _Ask, body: bytes, receive: Receive, send: Send, trace: Trace
    ) -> None:
        failed: HttpError | None = None
        async with anyio.create_task_group() as tg:
            # From here on, a client disconnect cancels the upstream request (llama-server stops).
            tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
            try:
                await self._answer(routes, ask, body, send, trace)
            except HttpError as exc:  # carried out of the task group (which would wrap it) to the app's boundary
                failed = exc
            finally:
                tg.cancel_scope.cancel()
        if failed is not None:
            raise failed

    async def _answer(self, routes: list[Target], ask: _Ask, body: bytes, send: Send, trace: Trace) -> None:
        """Ask the servers in turn: one that fails before answering (or, for a whole answer, before its head was
        sent on) is skipped for the next; a stream that breaks off later goes on elsewhere (`_go_on`)."""
        kind = resume.kind_of(self.path) if ask.payload.get("stream") is True and not ask.routed else None
        transcript = resume.Transcript(kind) if kind is not None else None
        for route in routes:
            last = route is routes[-1]
            trace.opening()
            try:
                resp = await self._open(route, ask.target, body, ask.headers)
            except UpstreamUnavailable as exc:
                log.warning("server %s of this model is unavailable: %s", route.node_id, exc)
                trace.server_failed(route.node_id)
                if not last:
                    trace.skipped()
                continue
            try:
                whole = await self._relay(resp, send, route.node_id, ask.stops, trace, transcript)
            except _NothingSent as exc:  # a whole answer cut off before its head went on: asked again, whole
                trace.server_failed(route.node_id)
                if last:
                    raise HttpError(502, "the model's server failed mid-answer; retry") from exc
                trace.skipped()
                continue
            finally:
                await resp.aclose()
            if not whole:  # a stream that broke off: go on on another server, or end it with the error event
                trace.server_failed(route.node_id)
                await self._go_on(ask, transcript, {route.node_id}, send, trace)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        msg = "no server of this model answered; retry shortly"
        raise HttpError(503, msg, "backend_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})

    async def _go_on(
        self, ask: _Ask, transcript: resume.Transcript | None, tried: set[str], send: Send, trace: Trace
    ) -> None:
        """Continue a stream that broke off on another server of the model (api/resume.py): the one that answers
        first, waiting up to `FAILOVER_WAIT_S` while the mesh says one is coming (a split re-placed, a standby
        promoting). Ends the stream with the API's error event when it cannot be continued or no server is left."""
        if transcript is not None and transcript.ended:  # all of the answer was sent: only its close is missing
            if tail := resume.closing(transcript):
                await send({"type": "http.response.body", "body": tail, "more_body": True})
            trace.finish("ok")
            return
        deadline = anyio.current_time() + FAILOVER_WAIT_S
        for _ in range(MAX_FAILOVERS):
            why = "not a streamed answer" if transcript is None else transcript.resumable()
            body = resume.continuation(ask.payload, transcript) if transcript is not None and why is None else None
            if transcript is None or body is None:
                log.warning("a stream of %s broke off and cannot go on elsewhere: %s", ask.name, why or "?")
                break
            found = await self._reopen(ask, json.dumps(body).encode(), tried, deadline, send)
            if found is None:
                break
            node_id, resp = found
            tried.add(node_id)
            trace.answered(node_id, resp.headers)
            self.metrics.failover(ask.name, "mid_stream")
            log.info("a stream of %s goes on on node %s after %d tokens", ask.name, node_id, transcript.tokens)
            try:
                whole = await self._stream(resp, send, trace, ask.stops, transcript, resume.Splice(transcript))
            finally:
                await resp.aclose()
            if whole:
                return
            trace.server_failed(node_id)
        trace.finish("upstream_error")
        msg = "the model's server failed mid-stream; the response is incomplete"
        await send({"type": "http.response.body", "body": sse_error_event(self.flavor, msg, "upstream_failed"),
                    "more_body": True})  # fmt: skip

    async def _reopen(
        self, ask: _Ask, body: bytes, tried: set[str], deadline: float, send: Send
    ) -> tuple[str, Response] | None:
        """The first server of the model that answers the continuation with a 2xx stream head: those not tried
        first, then any; while none does and the mesh says one is coming (a 503 from routing), every second until
        `deadline`, with an SSE comment now and then so the client's connection stays up. None: no server left."""
        last_note = anyio.current_time()
        while True:
            try:
                _, routes, _ = self._routes(ask.name, False, None)
            except HttpError as exc:
                if exc.status != 503:
                    return None  # no server and none coming
                routes = []
            for route in sorted(routes, key=lambda r: r.node_id in tried):
                try:
                    resp = await self._open(route, ask.target, body, ask.headers)
                except UpstreamUnavailable as exc:
                    log.warning("server %s cannot go on with the stream: %s", route.node_id, exc)
                    continue
                if resp.status < 300 and (resp.header(b"content-type") or b"").startswith(b"text/event-stream"):
                    return route.node_id, resp
                log.warning("server %s answered the continuation with %d", route.node_id, resp.status)
                await resp.aclose()
            now = anyio.current_time()
            if now >= deadline:
                return None
            if now - last_note >= NOTE_EVERY_S:
                last_note = now
                await send(
                    {"type": "http.response.body", "body": b": waiting for another server\n\n", "more_body": True}
                )
            await anyio.sleep(min(1.0, deadline - now))

    async def _stream(
        self,
        resp: Response,
        send: Send,
        trace: Trace,
        stop_sequences: tuple[str, ...],
        transcript: resume.Transcript | None,
        splice: resume.Splice | None = None,
    ) -> bool:
        """Relay one server's stream event by event (whole events only: `resume.SseEvents`); True when it ended,
        False when it broke off (the server failed, or said so with an error event, which is held back)."""
        rewrite = api_rewrite.AnthropicStream(stop_sequences) if self._anthropic_stream else None
        events = resume.SseEvents()

        async def relay(event: bytes) -> bool:
            if transcript is not None:
                if events.passthrough:
                    transcript.why_not = "an event past the size a continuation parses"
                else:
                    if splice is not None:
                        rewritten = splice.rewrite(event)
                        if rewritten is None:
                            return True  # what the client has already (the opening, the answer so far)
                        event = rewritten
                    transcript.see(event)
                    if transcript.failed:
                        return False  # the server's error event: held back, the stream goes on elsewhere
            if out := trace.feed(event):
                await send({"type": "http.response.body", "body": out, "more_body": True})
            return True

        try:
            async for chunk in resp.chunks():
                if rewrite is not None and not (chunk := rewrite.feed(chunk)):
                    continue
                for event in events.feed(chunk):
                    if not await relay(event):
                        return False
            for event in events.feed(rewrite.flush() if rewrite is not None else b""):
                if not await relay(event):
                    return False
            if tail := events.rest():
                if out := trace.feed(tail):
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            if tail := trace.flush():
                await send({"type": "http.response.body", "body": tail, "more_body": True})
        except UpstreamBroken as exc:
            log.warning("upstream failed mid-response: %s", exc)
            return False
        trace.finish("ok")
        return True

    @property
    def _anthropic_stream(self) -> bool:
        return self.flavor == "anthropic" and self.path == "/v1/messages"

    async def _relay(
        self,
        resp: Response,
        send: Send,
        node_id: str,
        stop_sequences: tuple[str, ...],
        trace: Trace,
        transcript: resume.Transcript | None = None,
    ) -> bool:
        """Send the client the server's answer; False when it was a stream that broke off (the rest is the
        caller's: another server, or the error event). The body's end is the caller's to send."""
        out_headers = [(k, v) for k, v in trace.answered(node_id, resp.headers) if k not in _HOP]
        if not any(k == SERVED_BY for k, _ in out_headers):  # a peer that served it has named itself
            out_headers.append((SERVED_BY, node_id.encode()))
        if resp.status >= 400:
            await self._error(resp, out_headers, send, trace)
            return True
        content_type = resp.header(b"content-type") or b""
        is_sse = content_type.startswith(b"text/event-stream")
        if self._anthropic_stream and not is_sse:
            await self._anthropic_message(resp, out_headers, send, stop_sequences, trace)
            return True
        if is_sse:  # the final event gets its `mesh_timing`: the length changes
            out_headers = [(k, v) for k, v in out_headers if k != b"content-length"]
            await send({"type": "http.response.start", "status": resp.status, "headers": out_headers + trace.headers()})
            if not await self._stream(resp, send, trace, stop_sequences, transcript):
                return False
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return True
        chunks = resp.chunks()
        trace.body(first := await _prefetch(chunks, PREFETCH_BYTES))
        await send({"type": "http.response.start", "status": resp.status, "headers": out_headers + trace.headers()})
        try:
            if first:
                await send({"type": "http.response.body", "body": first, "more_body": True})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            trace.finish("ok")
        except UpstreamBroken as exc:
            trace.finish("upstream_error")
            log.warning("upstream failed mid-response: %s", exc)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    async def _error(self, resp: Response, headers: list[tuple[bytes, bytes]], send: Send, trace: Trace) -> None:
        """An upstream error, read whole (at most `MAX_ERROR_BODY`) and answered in the client's API's shape.

        llama-server answers errors on /v1/messages in OpenAI's shape (`{"error": {"code", "type", ...}}`);
        Anthropic clients expect `{"type": "error", "error": {"type", "message"}}`. A context overflow becomes each
        API's own (`api_rewrite`). Rewritten once: a body a peer already rewrote passes unchanged."""
        raw = await _read_at_most(resp, MAX_ERROR_BODY)
        out = [(k, v) for k, v in headers if k != b"content-length"]
        if self.flavor == "anthropic":
            body = api_rewrite.anthropic_error_body(resp.status, raw)
        elif (rewritten := api_rewrite.openai_context_error(raw, self.path)) is not None:
            body = rewritten
        else:
            body = raw
        if body is not raw:
            out = [(k, v) for k, v in out if k != b"content-type"] + [(b"content-type", b"application/json")]
        out.append((b"content-length", str(len(body)).encode()))
        trace.failed(resp.status)
        await send({"type": "http.response.start", "status": resp.status, "headers": out + trace.headers()})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _anthropic_message(
        self,
        resp: Response,
        headers: list[tuple[bytes, bytes]],
        send: Send,
        stop_sequences: tuple[str, ...],
        trace: Trace,
    ) -> None:
        """A non-streaming /v1/messages answer, read whole and rewritten (`api_rewrite.anthropic_message`); one
        longer than `MAX_MESSAGE_BODY` passes unchanged. An upstream that breaks off before is a 502."""
        chunks = resp.chunks()
        raw = bytearray()
        try:
            async for chunk in chunks:
                raw += chunk
                if len(raw) > api_rewrite.MAX_MESSAGE_BODY:
                    break
        except UpstreamBroken as exc:
            log.warning("upstream failed mid-response: %s", exc)
            raise _NothingSent from exc
        trace.body(bytes(raw))
        headers = headers + trace.headers()
        trace.finish("ok")
        if len(raw) > api_rewrite.MAX_MESSAGE_BODY:
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            await send({"type": "http.response.body", "body": bytes(raw), "more_body": True})
            with contextlib.suppress(UpstreamBroken):
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        body = api_rewrite.anthropic_message(bytes(raw), stop_sequences)
        out = [(k, v) for k, v in headers if k != b"content-length"] + [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _naming(send: Send, name: str) -> Send:
    """`send` with the answer's head naming the model (`MODEL_HEADER`) unless a peer that served it already did."""
    value = name.encode() if name.isascii() and name.isprintable() else quote(name).encode()

    async def named(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            if not any(k.lower() == MODEL_HEADER for k, _ in headers):
                message = {**message, "headers": [*headers, (MODEL_HEADER, value)]}
        await send(message)

    return named


async def _prefetch(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The first chunks of a body, until past `limit` bytes or its end (the rest stays in `chunks`); a server that
    fails before raises `_NothingSent` (the request can be asked again, whole)."""
    first = bytearray()
    try:
        while len(first) <= limit:
            try:
                first += await anext(chunks)
            except StopAsyncIteration:
                break
    except UpstreamBroken as exc:
        log.warning("upstream failed mid-response: %s", exc)
        raise _NothingSent from exc
    return bytes(first)


async def _read_at_most(resp: Response, limit: int) -> bytes:
    """An upstream body up to about `limit` bytes (a failure mid-body keeps what arrived)."""
    raw = bytearray()
    with contextlib.suppress(UpstreamBroken):
        async for chunk in resp.chunks():
            raw += chunk
            if len(raw) > limit:
                break
    return bytes(raw)


def _facts(name: str, local: ModelStatus | None, remote: list[RemoteModel]) -> ModelFacts:
    """What the servers of a model know of it: the least context any gives, and whether it can call tools
    (true if any server says so, false only if one says so and none says otherwise)."""
    contexts = [c for c in ([local.context] if local else []) + [r.ctx for r in remote] if c]
    said = [t for t in ([local.tools] if local else []) + [r.tools for r in remote] if t is not None]
    return ModelFacts(name, min(contexts) if contexts else None, any(said) if said else None)


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return

"""`HttpTools`: the MCP tools' `MeshTools` over a running node's HTTP endpoints, its console (`/api/*`) and
its API (`/v1/*`), with HTTP and connection failures turned into the project's errors (the node's own
message kept)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx2

from mesh_mcp.errors import BackendLoading, BlackboardError, MeshLLMError, ModelNotFound, RateLimited
from mesh_mcp.mcp.local import api_root

START_HINT = "mesh-llm --client --blackboard"


class HttpTools:
    """`MeshTools` for a node running on this machine, through its console (`/api/*`) and API (`/v1/*`).

    Every call uses a fresh HTTP client (local calls; nothing to close). HTTP and connection failures
    become the project's errors, with the node's own message."""

    CONSOLE_TIMEOUT_S = 15.0
    ASK_TIMEOUT_S = 600.0  # a long answer from a model on CPU takes minutes

    def __init__(self, console_url: str, api_url: str) -> None:
        self.console_url = console_url.rstrip("/")
        self.api_url = api_root(api_url)

    # -- blackboard

    async def post(self, text: str, reply_to: str | None, author: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"text": text}
        if author is not None:
            body["author"] = author
        if reply_to is not None:
            body["reply_to"] = reply_to
        data = await self._request("POST", self.console_url + "/api/blackboard", json=body, blackboard=True)
        post = data.get("post")
        if not isinstance(post, dict):
            raise MeshLLMError(f"the node at {self.console_url} answered a post without the post: {str(data)[:200]}")
        return post

    async def search(
        self, query: str, author: str | None, kind: str | None, since_hours: float | None, limit: int
    ) -> list[dict[str, Any]]:
        return await self._posts({"q": query, "from": author, "kind": kind, "since": since_hours, "limit": limit})

    async def feed(
        self, author: str | None, kind: str | None, since_hours: float | None, limit: int
    ) -> list[dict[str, Any]]:
        return await self._posts({"from": author, "kind": kind, "since": since_hours, "limit": limit})

    async def _posts(self, params: Mapping[str, str | float | int | None]) -> list[dict[str, Any]]:
        query = {k: str(v) for k, v in params.items() if v is not None}
        data = await self._request("GET", self.console_url + "/api/blackboard", params=query, blackboard=True)
        posts = data.get("posts")
        if not isinstance(posts, list) or not all(isinstance(p, dict) for p in posts):
            raise MeshLLMError(f"the node at {self.console_url} answered without a list of posts: {str(data)[:200]}")
        return posts

    # -- mesh

    async def models(self) -> list[dict[str, Any]]:
        out = []
        for entry in await self._model_entries():
            caps = entry.get("capabilities")
            capabilities: dict[str, Any] = dict(caps) if isinstance(caps, dict) else {}
            for key in ("embeddings", "architecture", "context_length", "vision", "tools"):
                if key in entry and key not in capabilities:
                    capabilities[key] = entry[key]
            nodes = entry.get("nodes")
            out.append(
                {
                    "name": str(entry.get("id", "")),
                    "nodes": [str(n) for n in nodes] if isinstance(nodes, list) else [],
                    "state": str(entry.get("state", "serving")),
                    "capabilities": capabilities,
                }
            )
        return out

    async def status(self) -> dict[str, Any]:
        snap = await self._request("GET", self.console_url + "/api/status")
        keep = ("node_id", "name", "version", "mesh_id", "uptime_s", "api_url", "console_url", "peers", "blackboard")
        out = {k: snap[k] for k in keep if k in snap}  # not the invite token: a secret that admits machines
        models = snap.get("models")
        if isinstance(models, list):
            out["models"] = [
                {k: m.get(k) for k in ("name", "state", "detail", "in_flight")} for m in models if isinstance(m, dict)
            ]
        return out

    async def ask(self, question: str, model: str | None, max_tokens: int) -> dict[str, Any]:
        if model is None:
            model = await self._pick_model()
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "stream": False,
        }
        data = await self._request(
            "POST", self.api_url + "/v1/chat/completions", json=payload, wait_s=self.ASK_TIMEOUT_S
        )
        try:
            message = data["choices"][0]["message"]
            answer = message.get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise MeshLLMError(f"the model's server answered without a completion: {str(data)[:200]}") from exc
        answered_by = data.get("model")
        return {"model": answered_by if isinstance(answered_by, str) and answered_by else model, "answer": answer}

    async def _model_entries(self) -> list[dict[str, Any]]:
        data = await self._request("GET", self.api_url + "/v1/models")
        entries = data.get("data")
        if not isinstance(entries, list):
            raise MeshLLMError(f"the node at {self.api_url} answered /v1/models without a list: {str(data)[:200]}")
        return [e for e in entries if isinstance(e, dict)]

    async def _pick_model(self) -> str:
        """A serving generation model (the first the node lists: its own come first)."""
        entries = await self._model_entries()
        for entry in entries:
            if entry.get("state", "serving") == "serving" and not entry.get("embeddings") and entry.get("id"):
                return str(entry["id"])
        if any(e.get("state") in ("loading", "downloading") for e in entries):
            raise BackendLoading("no model of this mesh is serving yet; they are still loading: ask again in a minute")
        raise MeshLLMError(
            "no node of this mesh serves a model: start one with `mesh-llm --model NAME` "
            "(e.g. SmolLM2-135M-Instruct) or join a mesh that does"
        )

    # -- HTTP

    async def _request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        wait_s: float = CONSOLE_TIMEOUT_S,
        blackboard: bool = False,
    ) -> dict[str, Any]:
        base = _origin(url)
        try:
            async with httpx2.AsyncClient(timeout=httpx2.Timeout(wait_s, connect=5.0)) as client:
                resp = await client.request(method, url, json=json, params=params)
        except httpx2.ConnectError as exc:
            raise MeshLLMError(
                f"no mesh-llm node is running at {base} (connection refused): start one with `{START_HINT}`"
            ) from exc
        except httpx2.TimeoutException as exc:
            raise MeshLLMError(f"the mesh-llm node at {base} did not answer within {wait_s:g} s") from exc
        except httpx2.TransportError as exc:
            raise MeshLLMError(f"talking to the mesh-llm node at {base} failed: {exc or type(exc).__name__}") from exc
        if resp.status_code >= 400:
            raise _http_error(resp, base, blackboard)
        try:
            data = resp.json()
        except ValueError as exc:
            raise MeshLLMError(f"the node at {base} answered {method} {url} with something not JSON") from exc
        if not isinstance(data, dict):
            raise MeshLLMError(f"the node at {base} answered {method} {url} with JSON that is not an object")
        return data


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _error_message(resp: httpx2.Response) -> tuple[str, str | None]:
    """The message (and error code) of an error response: `{"error": {"message", "code"}}`,
    `{"error": "..."}`, or the body's text."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            code = err.get("code")
            return err["message"], code if isinstance(code, str) else None
        if isinstance(err, str):
            return err, None
        if isinstance(body.get("detail"), str):
            return body["detail"], None
    text = resp.text.strip()
    return (text[:500] if text else f"HTTP {resp.status_code} {resp.reason_phrase}"), None


def _retry_after(resp: httpx2.Response, default: float = 1.0) -> float:
    try:
        value = float(resp.headers.get("retry-after", ""))
    except ValueError:
        return default
    return value if math.isfinite(value) and value >= 0 else default


def _http_error(resp: httpx2.Response, base: str, blackboard: bool) -> MeshLLMError:
    message, code = _error_message(resp)
    status = resp.status_code
    if status == 429:
        return RateLimited(message, _retry_after(resp))
    if blackboard and status == 404:
        if "blackboard" in message:  # the node's own explanation
            return BlackboardError(message)
        return BlackboardError(f"the node at {base} has no blackboard (HTTP 404); start one with `{START_HINT}`")
    if blackboard and status in (400, 409, 413, 422, 507):
        return BlackboardError(message)
    if status == 404 and code == "model_not_found":
        return ModelNotFound(message)
    if status == 503 and ("retry-after" in resp.headers or code == "model_loading"):
        return BackendLoading(message)
    return MeshLLMError(f"the node at {base} answered HTTP {status}: {message}")

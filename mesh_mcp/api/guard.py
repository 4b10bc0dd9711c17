"""The HTTP front door of both servers (:9337 API + MCP, :3131 console): who may ask what, decided without I/O.

`decide(policy, surface, facts)` is pure: the facts of one request (method, path, peer address, Host,
Origin, content type, declared length, API key) in, a verdict out — `Refuse` (status + a sentence, in
the API's own error shape), `Preflight` (a CORS preflight answered here) or `Admit` (with the body
limit, whether the request is *local* — may see the invite token — and the CORS origin to echo).
`middleware.HttpGuard` is the thin ASGI middleware that asks `decide` and acts. The command line's
`--api-key`/`--cors-origin` values are read here too (`api_keys`, `cors_origin`).

The rules, in order (docs/ARCHITECTURE.md has the threat model):
1. Host: a node listening on loopback answers only loopback names (127.0.0.0/8, localhost, [::1]):
   a web page that rebinds its own name to 127.0.0.1 gets 421. `--listen-all` takes any Host.
2. Origin: absent (not a browser), same-origin, or in the operator's `--cors-origin` allow-list;
   any other (including `null`) is 403.
3. CORS preflight (OPTIONS + Access-Control-Request-Method) from an allowed origin: 204 here.
4. API key: on `--listen-all` (unless `--no-auth`), a client that is not this machine — or that is,
   but names a non-loopback Host (a rebound page) — needs `Authorization: Bearer KEY` or
   `x-api-key: KEY` for the API (all but /health), /mcp, console writes, the blackboard and /metrics.
   Keys are compared in constant time against every key and never logged.
5. Body: a declared Content-Length over the route's limit is 413 before a byte is read.
6. CSRF: POST/PUT/PATCH/DELETE need a non-simple content type (JSON) or a key header — the kinds of
   request a browser cannot send cross-site without a preflight — else 415.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from starlette.types import Scope

from mesh_mcp.api.app import MAX_BODY_BYTES
from mesh_mcp.api.errors import Flavor
from mesh_mcp.errors import ConfigError
from mesh_mcp.mcp.local import MCP_PATHS

Kind = Literal["api", "console"]

KEYS_ENV = "MESH_LLM_API_KEYS"  # path of a file of API keys, one per line (blank lines and # comments ignored)
MAX_KEYS = 10_000
MCP_BODY_BYTES = 1 << 20  # an MCP tool call is a few KiB; posts are capped at 8 KiB of text
CONSOLE_BODY_BYTES = 64 << 10  # a blackboard post or a control; only the chat (CONSOLE_CHAT) takes more
CONSOLE_CHAT = "/api/chat"
DRAIN_BYTES = 2 * MAX_BODY_BYTES  # a refused body up to this size is read and dropped, past it the connection closed
PREFLIGHT_MAX_AGE_S = 600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Content types a browser may send cross-site without a preflight (the Fetch spec's "simple" ones).
SIMPLE_TYPES = frozenset({"", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::(?P<port>[0-9]{1,5}))?$")
_ORIGIN = re.compile(
    r"^(?P<scheme>https?)://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?$", re.IGNORECASE
)
_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~, -]{0,1024}$")
_SECURITY_HEADERS = (b"host", b"origin", b"authorization", b"x-api-key", b"content-type", b"content-length")


_KEY = re.compile(r"^[\x21-\x7e]{1,512}$")  # what fits in a header value unquoted: printable ASCII, no spaces


def api_keys(given: list[str], keys_file: str | None) -> tuple[str, ...]:
    """The keys of `--api-key` plus those in the `MESH_LLM_API_KEYS` file; `ConfigError` with a sentence."""
    keys = list(given)
    if keys_file:
        path = Path(keys_file).expanduser()
        try:
            with path.open(encoding="utf-8") as fh:
                lines = fh.read(MAX_KEYS * 514).splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the API keys file {path} ({KEYS_ENV}): {exc}") from exc
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise ConfigError(f"the API keys file {path} ({KEYS_ENV}) holds no key; put one key per line")
    for n, key in enumerate(keys, 1):
        if not _KEY.match(key):
            # The key itself is never printed: only which one and why.
            raise ConfigError(f"API key #{n} is not 1-512 printable ASCII characters without spaces")
    if len(keys) > MAX_KEYS:
        raise ConfigError(f"{len(keys)} API keys is more than the {MAX_KEYS} a node takes")
    return tuple(dict.fromkeys(keys))


def cors_origin(origin: str) -> str:
    """A `--cors-origin` value, normalized; `ConfigError` unless it is `http(s)://host[:port]`."""
    norm = normalize_origin(origin)
    if norm is None:
        raise ConfigError(
            f"--cors-origin {origin!r} is not an origin: give scheme, host and port as a browser sends them, "
            "e.g. http://localhost:5173 or https://app.example.com"
        )
    return norm


@dataclass(frozen=True)
class Policy:
    """What the operator chose: `--listen-all`, `--api-key` / MESH_LLM_API_KEYS, `--no-auth`, `--cors-origin`."""

    listen_all: bool = False
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    no_auth: bool = False
    cors_origins: frozenset[str] = frozenset()  # normalized by `normalize_origin`

    @property
    def keys_required(self) -> bool:
        """Whether requests from other machines must carry a key (fails closed: listen-all with no keys and no
        --no-auth refuses them all; the command line never starts such a node)."""
        return self.listen_all and not self.no_auth


@dataclass(frozen=True)
class Surface:
    """Which server a request reached; the path-dependent rules (body limit, key, error shape)."""

    kind: Kind

    def body_limit(self, path: str) -> int:
        if self.kind == "console":  # the chat carries a whole conversation, as /v1 does; the rest is small
            return MAX_BODY_BYTES if path == CONSOLE_CHAT else CONSOLE_BODY_BYTES
        return MCP_BODY_BYTES if path in MCP_PATHS else MAX_BODY_BYTES

    def needs_key(self, method: str, path: str) -> bool:
        if self.kind == "api":
            return path != "/health"
        return method not in SAFE_METHODS or path.startswith("/api/blackboard") or path == "/metrics"

    def flavor(self, path: str) -> Flavor:
        if self.kind == "api" and path.startswith("/v1/messages"):
            return "anthropic"
        if self.kind == "api" and path.startswith("/v1"):
            return "openai"
        return "plain"


API = Surface("api")
CONSOLE = Surface("console")


@dataclass(frozen=True)
class Facts:
    """What `decide` looks at, read from an ASGI scope by `Facts.of`."""

    method: str
    path: str
    client: str = ""
    host: str | None = None
    origin: str | None = None
    content_type: str | None = None
    content_length: str | None = None
    chunked: bool = False  # Transfer-Encoding: chunked (a body of unknown length)
    authorization: str | None = field(default=None, repr=False)
    x_api_key: str | None = field(default=None, repr=False)
    preflight_method: str | None = None  # Access-Control-Request-Method
    preflight_headers: str | None = None  # Access-Control-Request-Headers
    repeated: str | None = None  # a security-relevant header sent more than once

    def drain_after_refusal(self) -> bool:
        """Whether a refusal can leave the unread body for uvicorn to read and discard (keeping the connection,
        so the client reads the answer instead of a reset): only a declared body of at most `DRAIN_BYTES`."""
        declared = self.content_length
        if self.chunked or (declared is not None and not declared.isdigit()):
            return False
        return declared is None or int(declared) <= DRAIN_BYTES

    @classmethod
    def of(cls, scope: Scope) -> Facts:
        seen: dict[bytes, str] = {}
        repeated = None
        for raw_key, raw_value in scope.get("headers", ()):
            key = bytes(raw_key).lower()
            value = bytes(raw_value).decode("latin-1").strip()
            if key in seen and key in _SECURITY_HEADERS and seen[key] != value:
                repeated = key.decode()
            seen.setdefault(key, value)
        client = scope.get("client")
        return cls(
            method=str(scope.get("method", "GET")).upper(),
            path=str(scope.get("path", "/")),
            client=str(client[0]) if client else "",
            host=seen.get(b"host"),
            origin=seen.get(b"origin"),
            content_type=seen.get(b"content-type"),
            content_length=seen.get(b"content-length"),
            chunked="chunked" in seen.get(b"transfer-encoding", "").lower(),
            authorization=seen.get(b"authorization"),
            x_api_key=seen.get(b"x-api-key"),
            preflight_method=seen.get(b"access-control-request-method"),
            preflight_headers=seen.get(b"access-control-request-headers"),
            repeated=repeated,
        )


@dataclass(frozen=True)
class Refuse:
    status: int
    message: str
    flavor: Flavor
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Preflight:
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Admit:
    local: bool  # may see secrets: this machine, a loopback Host, no foreign Origin
    body_limit: int
    flavor: Flavor
    cors_origin: str | None = None  # an allow-listed cross origin to echo in Access-Control-Allow-Origin


Verdict = Refuse | Preflight | Admit


def is_loopback_ip(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_loopback_name(hostname: str) -> bool:
    """localhost (and RFC 6761's *.localhost, which browsers resolve to loopback), or a loopback IP literal."""
    name = hostname.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or is_loopback_ip(name)


def _split_host(host: str) -> tuple[str, int | None] | None:
    """A Host header as (hostname, port), or None if it is not a plain name/IP with an optional port."""
    m = _HOST.match(host)
    if m is None:
        return None
    port = int(m["port"]) if m["port"] else None
    if port is not None and port > 65535:
        return None
    return (m["v6"] or m["name"]).lower(), port


def normalize_origin(origin: str) -> str | None:
    """`scheme://host[:port]` lowercased, default port dropped; None if it is not such an origin."""
    m = _ORIGIN.match(origin.strip().rstrip("/"))
    if m is None:
        return None
    scheme, host = m["scheme"].lower(), m["host"].lower()
    port = int(m["port"]) if m["port"] else None
    if port is not None and port > 65535:
        return None
    if port == {"http": 80, "https": 443}[scheme]:
        port = None
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


def _same_origin(origin: str, host: tuple[str, int | None] | None) -> bool:
    """Origin names the server the request reached (we serve plain http). Loopback names count as one."""
    norm = normalize_origin(origin)
    if norm is None or host is None or not norm.startswith("http://"):
        return False
    parsed = _split_host(norm.removeprefix("http://"))
    if parsed is None:
        return False
    (oname, oport), (hname, hport) = parsed, host
    if (oport or 80) != (hport or 80):
        return False
    return oname.strip("[]") == hname or (is_loopback_name(oname.strip("[]")) and is_loopback_name(hname))


def _presented_keys(facts: Facts) -> list[str]:
    keys = []
    if facts.authorization is not None:
        scheme, _, token = facts.authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            keys.append(token.strip())
    if facts.x_api_key:
        keys.append(facts.x_api_key)
    return keys


def key_is_valid(presented: str, keys: tuple[str, ...]) -> bool:
    """Constant-time against every key (no early exit: the time does not say which key nearly matched)."""
    ok = False
    candidate = presented.encode("utf-8", "surrogateescape")
    for key in keys:
        ok |= hmac.compare_digest(candidate, key.encode("utf-8", "surrogateescape"))
    return ok


def decide(policy: Policy, surface: Surface, facts: Facts) -> Verdict:
    """The guard's verdict on one HTTP request (see the module docstring for the rules)."""
    flavor = surface.flavor(facts.path)
    if facts.repeated is not None:
        return Refuse(400, f"the {facts.repeated} header is sent more than once with different values", flavor)
    host = _split_host(facts.host) if facts.host is not None else None
    if facts.host is not None and host is None:
        return Refuse(400, f"the Host header {facts.host[:100]!r} is not a host name or address", flavor)
    host_is_loopback = host is not None and is_loopback_name(host[0])
    if not policy.listen_all and host is not None and not host_is_loopback:
        return Refuse(
            421,
            f"this node only answers requests addressed to localhost or 127.0.0.1, not {(facts.host or '')[:100]!r} "
            "(a web page cannot reach it by rebinding a name); to serve other machines, start it with --listen-all "
            "and --api-key",
            flavor,
        )
    cors_origin = None
    if facts.origin is not None and not _same_origin(facts.origin, host):
        norm = normalize_origin(facts.origin)
        if norm is None or norm not in policy.cors_origins:
            return Refuse(
                403,
                f"requests from web pages at {facts.origin[:100]!r} are refused; to let a browser app there use this "
                "node, start it with --cors-origin ORIGIN",
                flavor,
            )
        cors_origin = facts.origin
    if facts.method == "OPTIONS" and facts.preflight_method is not None and facts.origin is not None:
        return Preflight(_preflight_headers(facts))
    # An allowed browser app must be able to read its refusals (a 401 it can act on), so they carry CORS too.
    cors = (("Access-Control-Allow-Origin", cors_origin), ("Vary", "Origin")) if cors_origin is not None else ()
    client_is_loopback = is_loopback_ip(facts.client)
    exempt = client_is_loopback and host_is_loopback  # this machine, not a page that rebound its name
    if policy.keys_required and not exempt and surface.needs_key(facts.method, facts.path):
        presented = _presented_keys(facts)
        auth = (("WWW-Authenticate", 'Bearer realm="mesh-llm"'), *cors)
        if not presented:
            return Refuse(
                401,
                "this node needs an API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY' (the "
                "node's operator has the keys it was started with, --api-key or MESH_LLM_API_KEYS)",
                flavor,
                auth,
            )
        if not any(key_is_valid(k, policy.api_keys) for k in presented):
            return Refuse(401, "the API key is not valid for this node; ask its operator for a key", flavor, auth)
    limit = surface.body_limit(facts.path)
    if facts.content_length is not None:
        if not facts.content_length.isdigit():
            return Refuse(400, "the Content-Length header is not a whole number", flavor, cors)
        if int(facts.content_length) > limit:
            message = f"the request body is {facts.content_length} bytes; at most {limit} are taken"
            return Refuse(413, message, flavor, cors)
    has_key_header = facts.authorization is not None or facts.x_api_key is not None
    media = (facts.content_type or "").split(";", 1)[0].strip().lower()
    if facts.method not in SAFE_METHODS and media in SIMPLE_TYPES and not has_key_header:
        what = f"Content-Type {media}" if media else "no Content-Type"
        return Refuse(
            415,
            f"send the request body as JSON with 'Content-Type: application/json' (this request has {what}, "
            "which any web page could send)",
            flavor,
            cors,
        )
    local = exempt and (facts.origin is None or cors_origin is None)
    return Admit(local=local, body_limit=limit, flavor=flavor, cors_origin=cors_origin)


def _preflight_headers(facts: Facts) -> tuple[tuple[str, str], ...]:
    asked = facts.preflight_headers or ""
    allow = asked if asked and _HEADER_LIST.match(asked) else "authorization, content-type, x-api-key"
    return (
        ("Access-Control-Allow-Origin", facts.origin or ""),
        ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
        ("Access-Control-Allow-Headers", allow),
        ("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE_S)),
        ("Vary", "Origin"),
    )

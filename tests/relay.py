"""A real Nostr relay on loopback for the discovery tests: the `nostr-relay` package (1.14), in its own venv.

nostr-relay's pins (SQLAlchemy, aiohttp, uvicorn, pydantic) may clash with ours, so it lives in a venv of its own
under the cache (`~/.cache/mesh-llm/nostr-relay-venv`), created on first use with `python -m venv` + `pip install`
and reused; a half-built venv is never used (it is built beside the final path and renamed when complete).

The relay is configured as permissively as a hostile relay could be: no validators at all (it stores bad
signatures, old events, oversized content, any kind), so the tests see what a stranger's relay may serve.
It still applies NIP-33 replacement (an addressable event replaces an older one of the same author, kind and
`d`) and NIP-09 deletion by `e` tag; it does not filter expired events on query (its garbage collector runs
every 300 s), so expiry is the client's job, which is what the tests check.

    from tests.relay import Relay, relay_fixture  # the fixture is named `relay`

    def test_x(relay: Relay) -> None:
        relay.url                       # ws://127.0.0.1:PORT
        relay.inject({...})             # store a raw event (any JSON), bypassing client-side checks
        relay.stored()                  # every stored event, as dicts
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from inference.paths import cache_dir
from tests.harness import free_port

VERSION = "1.14"
START_TIMEOUT_S = 60.0  # a cold start runs alembic migrations first; ~3 s when warm
INSTALL_TIMEOUT_S = 600.0
MAIN = "import sys; from nostr_relay.cli import main; sys.exit(main())"

# Sends one raw message on a websocket and prints the relay's first answer (the relay venv has `websockets`).
INJECT = """
import asyncio, sys, websockets
async def go():
    async with websockets.connect(sys.argv[1], open_timeout=10) as ws:
        await ws.send(sys.stdin.read())
        print(await asyncio.wait_for(ws.recv(), 10))
asyncio.run(go())
"""


def relay_python() -> Path:
    """The venv's python, creating the venv on first use (cached; a lock keeps parallel runs from racing)."""
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    venv = base / "nostr-relay-venv"
    marker = venv / f"nostr-relay-{VERSION}.ok"
    if marker.is_file():
        return venv / "bin" / "python"
    with open(base / "nostr-relay-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.is_file():
            partial = base / "nostr-relay-venv.partial"
            shutil.rmtree(partial, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(partial)], check=True, timeout=INSTALL_TIMEOUT_S)
            subprocess.run(
                [str(partial / "bin" / "python"), "-m", "pip", "install", "-q", f"nostr-relay=={VERSION}"],
                check=True,
                timeout=INSTALL_TIMEOUT_S,
            )
            (partial / marker.name).touch()
            shutil.rmtree(venv, ignore_errors=True)
            partial.rename(venv)  # scripts' shebangs name the old path: we only ever run `python -c`
    return venv / "bin" / "python"


def _config(port: int, db: Path) -> dict[str, Any]:
    return {
        "DEBUG": False,
        "relay_name": "mesh-llm test relay",
        "storage": {"sqlalchemy.url": f"sqlite+aiosqlite:///{db}", "validators": []},
        "verification": {"nip05_verification": "disabled"},
        "gunicorn": {"bind": f"127.0.0.1:{port}", "workers": 1, "loglevel": "warning"},
        "authentication": {"enabled": False},
        "garbage_collector": {"collect_interval": 3600},
        "max_event_size": 1 << 20,
        "logging": {"version": 1, "root": {"level": "WARNING"}},
    }


def _accepts_websocket(port: int) -> bool:
    """True when the relay answers a websocket upgrade with 101 (not merely when the port is open)."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(request.encode())
            return s.recv(64).startswith(b"HTTP/1.1 101")
    except OSError:
        return False


@dataclass
class Relay:
    url: str
    python: Path
    config: Path
    process: subprocess.Popen[bytes]
    log: Path

    def stored(self) -> list[dict[str, Any]]:
        """Every event the relay has stored (`nostr-relay dump`), as dicts."""
        out = subprocess.run(
            [str(self.python), "-c", MAIN, "-c", str(self.config), "dump"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return [json.loads(line)[1] for line in out.splitlines() if line.startswith('["EVENT"')]

    def inject(self, event: dict[str, Any] | str) -> str:
        """Send one raw `["EVENT", event]` to the relay (any JSON, unchecked) and return its answer."""
        message = json.dumps(["EVENT", event]) if isinstance(event, dict) else event
        return subprocess.run(
            [str(self.python), "-c", INJECT, self.url],
            input=message,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_relay(workdir: Path) -> Relay:
    python = relay_python()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "relay.yaml"
    config.write_text(json.dumps(_config(port, workdir / "nostr.sqlite3")))  # JSON is YAML
    log = workdir / "relay.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(python), "-c", MAIN, "-c", str(config), "serve", "--use-uvicorn"],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    relay = Relay(url=f"ws://127.0.0.1:{port}", python=python, config=config, process=process, log=log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _accepts_websocket(port):
        if process.poll() is not None or time.monotonic() > deadline:
            relay.stop()
            raise RuntimeError(f"nostr-relay did not start on port {port}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    return relay


@pytest.fixture(name="relay")
def relay_fixture(tmp_path: Path) -> Iterator[Relay]:
    """A real nostr-relay on 127.0.0.1 (a free port), its sqlite store in the test's tmp dir; stopped after."""
    r = start_relay(tmp_path / "relay")
    try:
        yield r
    finally:
        r.stop()

"""The hand-off edits at llama.cpp level, without the mesh: three ggml-rpc-servers (w1, w2, the host's own), each
behind a byte-counting Python splicer, and a plain peer link per worker (reads `u16 length | name`, splices to that
stage) — llama-server `--rpc w1,w2,host -ts 1,1,1` answers a prompt at temperature 0 with and without
MESH_LLM_RPC_PEERS. Prints the text (it must not change), tokens/s and bytes per decoded token on every link
(`host-X>`: llama-server to X, `host-X<`: X's replies, `X-peer>`: X's pushes to the next stage).

    python bench/handoff_rpc.py ~/.cache/mesh-llm/llama.cpp/<build>/bin MODEL.gguf --handoff [--tokens 32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx2

PROMPT = "def fibonacci(n):"
NAMES = ("w1", "w2", "host")
NEXT = {"w1": "w2", "w2": "host"}


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes: dict[str, int] = {}

    def add(self, key: str, n: int) -> None:
        with self.lock:
            self.bytes[key] = self.bytes.get(key, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.bytes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pump(a: socket.socket, b: socket.socket, key: str, counts: Counts) -> None:
    with contextlib.suppress(OSError):
        while data := a.recv(65536):
            counts.add(key, len(data))
            b.sendall(data)
    for s in (a, b):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


def splicer(port: int, target: Callable[[socket.socket], int], key: str, counts: Counts) -> None:
    """Accept on 127.0.0.1:port; each connection goes to the port `target` picks (it may read a header first)."""
    server = socket.create_server(("127.0.0.1", port))

    def accept() -> None:
        while True:
            conn, _ = server.accept()
            up = socket.create_connection(("127.0.0.1", target(conn)))
            for s in (conn, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=pump, args=(conn, up, key + ">", counts), daemon=True).start()
            threading.Thread(target=pump, args=(up, conn, key + "<", counts), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bin", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--handoff", action="store_true")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    counts = Counts()
    rpc = {n: free_port() for n in NAMES}
    front = {n: free_port() for n in NAMES}
    link = {n: free_port() for n in NAMES}
    procs = []
    try:
        for n in NAMES:
            env = {**os.environ, **({"MESH_LLM_RPC_PEER_LINK": f"127.0.0.1:{link[n]}"} if n in NEXT else {})}
            cmd = [str(args.bin / "ggml-rpc-server"), "-p", str(rpc[n]), "-t", "1"]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))

            def direct(c: socket.socket, n: str = n) -> int:
                return rpc[n]

            splicer(front[n], direct, f"host-{n}", counts)

            def named(c: socket.socket, n: str = n) -> int:
                size = int.from_bytes(c.recv(2, socket.MSG_WAITALL), "little")
                name = c.recv(size, socket.MSG_WAITALL).decode()
                assert name == NEXT[n], (name, NEXT[n])
                return rpc[name]

            splicer(link[n], named, f"{n}-peer", counts)
        time.sleep(1.5)  # the rpc-servers bind (a manual bench: no readiness probe)
        port = free_port()
        env = dict(os.environ)
        if args.handoff:
            env["MESH_LLM_RPC_PEERS"] = f"127.0.0.1:{front['w2']}=w2,127.0.0.1:{front['host']}=host"
        cmd = [str(args.bin / "llama-server"), "-m", str(args.model), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["-t", "1", "-ngl", "99", "--rpc", ",".join(f"127.0.0.1:{front[n]}" for n in NAMES), "-ts", "1,1,1"]
        cmd += ["-c", "2048", "--parallel", "1", "--no-webui"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        api = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx2.TransportError):
                if httpx2.get(api + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)

        def ask(n: int) -> dict[str, object]:
            body = {"prompt": PROMPT, "n_predict": n, "temperature": 0, "cache_prompt": False}
            r = httpx2.post(api + "/completion", json=body, timeout=300)
            r.raise_for_status()
            return dict(r.json())

        ask(4)
        before = counts.snapshot()
        ask(1)
        mid = counts.snapshot()
        many = ask(args.tokens + 1)
        after = counts.snapshot()
        per = {k: ((after[k] - mid.get(k, 0)) - (mid.get(k, 0) - before.get(k, 0))) / args.tokens for k in after}
        print("text", json.dumps(many["content"]))
        print("tok/s", many["timings"]["predicted_per_second"])  # type: ignore[index]
        print("bytes per decoded token", json.dumps({k: round(v) for k, v in sorted(per.items())}))
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()

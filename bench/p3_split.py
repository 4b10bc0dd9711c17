"""P3/P5: pipeline-split decode speed on one machine, against the fair references.

On one machine a single stream's stages run one after another, so the reference is solo with one
node's threads (here 1), not all of them. For N = 2 and 3 it measures, with every process at
`--threads 1`:

- solo: `mesh-llm --model M --threads 1`;
- mesh: `mesh-llm --model M --split N --threads 1` on 127.0.0.2 plus N-1 workers joined on
  127.0.0.3.., asked through a *worker's* API (one mesh hop on top of the split);
- stock: llama-server `--rpc` straight to N local ggml-rpc-servers (`-t 1`), the same `-ts` as the
  mesh's plan, no relays, no TLS, and llama.cpp RPC's own protocol (the host relays each stage's output);
  `--stock-bin DIR` takes llama-server and ggml-rpc-server from a build without the hand-off edits (e.g. the
  previous pin's), else this build runs without MESH_LLM_RPC_PEERS (compact inputs, no hand-off);
- P5: bytes per *decoded* token across each stage boundary: a long and a one-token answer to the same prompt,
  the difference over the difference in tokens. Stock: counting proxies in front of its rpc-servers, in a
  second load (not in the speed run). Mesh: each worker's data-plane bytes in and out, with every peer, from
  its /metrics. Against 2 × n_embd × 4.

`--rtt-ms 5,20` repeats mesh and stock with that round trip between every pair of nodes (half each way):
for the mesh, every node — the host too — binds 127.0.0.(2+i) and advertises 127.0.0.(12+i), where a UDP link
(QUIC control plane) and a TCP link (the RPC data plane, same port number) add half the RTT each way, so any
connection (host → worker, worker → next worker, last worker → host) crosses one link; for stock, a TCP link
in front of each worker's rpc-server. Floors, with compute = 1 / solo: stock llama.cpp RPC pays a round trip
per worker per token, 1 / (compute + (n − 1) × RTT); a chain host → worker 1 → … → host pays half a round
trip per crossing, 1 / (compute + n/2 × RTT).

Tokens/s is llama-server's own `timings.predicted_per_second` for each request (median of runs).

    python bench/p3_split.py --model SmolLM2-135M-Instruct-Q4_1 --runs 5 --tokens 64 [--rtt-ms 5,20] \
        [--stock-bin ~/.cache/mesh-llm/llama.cpp/<previous build>/bin]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference import paths
from inference.gguf_facts import read_facts
from inference.provision import ensure_llama_cpp
from tests.harness import NodeProcess, free_port
from tests.netproxy import LinkProxy, TcpLink

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def tok_s(api: str, model: str, tokens: int, runs: int) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    out = []
    for i in range(runs + 1):
        r = None
        for _ in range(150):
            r = httpx2.post(api + "/v1/completions", json=body, timeout=600)
            if r.status_code != 503:
                break
            time.sleep(0.2)
        assert r is not None and r.status_code == 200, r.text if r is not None else "no answer"
        if i:  # the first run warms up
            out.append(float(r.json()["timings"]["predicted_per_second"]))
    return statistics.median(out)


class Counter:
    """A TCP proxy counting bytes both ways (127.0.0.1:port → target), a thread per direction."""

    def __init__(self, target: int) -> None:
        self.target, self.up, self.down = target, 0, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                up = socket.create_connection(("127.0.0.1", self.target))
                for s in (conn, up):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=self._pump, args=(conn, up, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(up, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                with self.lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def total(self) -> int:
        with self.lock:
            return self.up + self.down


def answer(api: str, model: str, tokens: int) -> int:
    """One answer of `tokens` tokens (no prompt cache); the tokens generated."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    r = httpx2.post(api + "/v1/completions", json={**body, "cache_prompt": False}, timeout=600)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


def per_decoded_token(api: str, model: str, tokens: int, read: Any) -> list[float]:
    """Bytes per decoded token of each counter `read()` returns: a long minus a one-token answer."""
    answer(api, model, 2)  # warm
    before = read()
    short = answer(api, model, 1)
    mid = read()
    long = answer(api, model, tokens + 1)
    after = read()
    return [((c - b) - (b - a)) / (long - short) for a, b, c in zip(before, mid, after, strict=True)]


def _launch(llama: Any, model: Path, ports: list[int], ts: list[float]) -> tuple[subprocess.Popen[bytes], str]:
    api_port = free_port()
    rpc = ",".join(f"127.0.0.1:{p}" for p in ports)
    cmd = [str(llama.server), "-m", str(model), "--rpc", rpc, "-ngl", "999", "-ts", ",".join(map(str, ts))]
    cmd += ["--threads", "1", "--port", str(api_port), "-c", "4096", "-np", "1", "--fit", "off", "--alias", "m"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{api_port}"
    deadline = time.monotonic() + 900  # a 1 GB model through the counting proxies loads in minutes
    while time.monotonic() < deadline:
        try:
            if httpx2.get(api + "/health", timeout=1).status_code == 200:
                break
        except httpx2.TransportError:
            pass
        time.sleep(0.1)
    return proc, api


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def stock(
    llama: Any, model: Path, n: int, ts: list[float], tokens: int, runs: int, rtt_ms: float = 0.0
) -> tuple[float, list[float]]:
    """Speed with llama-server straight on the rpc-servers (through a delaying TCP link in front of
    each worker's when `rtt_ms`); then, without delay, P5 bytes through counting proxies in a second
    load (the proxies cost time, so they are not in the speed run)."""
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as links:
        links.callback(lambda: list(map(_stop, procs)))
        ports = [free_port() for _ in range(n)]
        for p in ports:
            cmd = [str(llama.rpc_server), "-t", "1", "-p", str(p)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)
        via = list(ports)
        if rtt_ms:  # the last rpc-server is the host's own: no link in front of it
            for i, p in enumerate(ports[:-1]):
                link = links.enter_context(TcpLink(("127.0.0.1", 0), ("127.0.0.1", p), delay_ms=rtt_ms / 2).start())
                via[i] = link.port
        server, api = _launch(llama, model, via, ts)
        procs.append(server)
        speed = tok_s(api, "m", tokens, runs)
        _stop(server)
        if rtt_ms:
            return speed, []
        counters = [Counter(p) for p in ports]
        server, api = _launch(llama, model, [c.port for c in counters], ts)
        procs.append(server)
        return speed, per_decoded_token(api, "m", tokens, lambda: [c.total() for c in counters])


def mesh(
    tmp: Path, model: str, n: int, tokens: int, runs: int, models_dir: Path, rtt_ms: float = 0.0
) -> tuple[float, dict[str, Any], list[float]]:
    """(tok/s, the host's placement, data-plane bytes per decoded token through each worker)."""
    env = {"MESH_LLM_MODELS": str(models_dir)}
    nodes = []
    with contextlib.ExitStack() as links:

        def linked(i: int) -> list[str]:
            return linked_args(links, i, rtt_ms)

        try:
            host = NodeProcess(tmp / f"h{n}-{rtt_ms:g}", ["--mesh-host", "127.0.0.2", "--model", model, "--split",
                               str(n), "--threads", "1", "--parallel", "1", *linked(0)], env=env).start()  # fmt: skip
            nodes.append(host)
            token = host.wait_for("token", lambda s: bool(s.get("invite_token")), timeout=60)["invite_token"]
            for i in range(1, n):
                args = ["--mesh-host", f"127.0.0.{2 + i}", "--join", token, "--threads", "1", *linked(i)]
                nodes.append(NodeProcess(tmp / f"w{n}{i}-{rtt_ms:g}", args, env=env).start())
            status = host.wait_model_state(model, "serving", timeout=600)
            speed = tok_s(nodes[-1].api, model, tokens, runs)
            workers = nodes[1:]
            moved = (
                []
                if rtt_ms
                else per_decoded_token(host.api, model, tokens, lambda: [w.dataplane_bytes() for w in workers])
            )
            return speed, status["placement"], moved
        finally:
            for node in nodes:
                node.stop()


def linked_args(links: contextlib.ExitStack, i: int, rtt_ms: float) -> list[str]:
    """Node i (127.0.0.(2+i)) behind links that add the delay, advertised at 127.0.0.(12+i): QUIC (UDP) and the data
    plane (TCP), one port number; the node's extra arguments (none without a delay)."""
    if not rtt_ms:
        return []
    ip, port, link_ip = f"127.0.0.{2 + i}", free_port(), f"127.0.0.{12 + i}"
    links.enter_context(LinkProxy((link_ip, port), (ip, port), delay_ms=rtt_ms / 2).start())
    links.enter_context(TcpLink((link_ip, port), (ip, port), delay_ms=rtt_ms / 2).start())
    return ["--bind-port", str(port), "--advertise", link_ip]


def solo(tmp: Path, model: str, tokens: int, runs: int, models_dir: Path) -> float:
    node = NodeProcess(tmp / "solo", ["--model", model, "--threads", "1", "--parallel", "1"],
                       env={"MESH_LLM_MODELS": str(models_dir)}).start()  # fmt: skip
    try:
        node.wait_model_state(model, "serving", timeout=600)
        return tok_s(node.api, model, tokens, runs)
    finally:
        node.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct-Q4_1")
    ap.add_argument("--models-dir", type=Path, default=paths.cache_dir() / "test-models")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rtt-ms", default="", help="also measure with these round trips added, e.g. 5,20")
    ap.add_argument("--nodes", default="2,3")
    ap.add_argument("--stock-bin", type=Path, help="llama-server and ggml-rpc-server without the hand-off edits")
    ap.add_argument("--no-solo", action="store_true", help="skip solo (the floors then need --solo-tok-s)")
    ap.add_argument("--solo-tok-s", type=float, default=0.0)
    args = ap.parse_args()
    rtts = [float(x) for x in args.rtt_ms.split(",") if x]
    llama: Any = anyio.run(ensure_llama_cpp)
    if args.stock_bin:
        llama = SimpleNamespace(server=args.stock_bin / "llama-server", rpc_server=args.stock_bin / "ggml-rpc-server")
    path = args.models_dir / f"{args.model}.gguf"
    facts = read_facts(path)
    floor = 2 * facts.n_embd * 4
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        base = args.solo_tok_s if args.no_solo else solo(tmp, args.model, args.tokens, args.runs, args.models_dir)
        print(f"solo, 1 thread: {base:.1f} tok/s", flush=True)
        for n in [int(x) for x in args.nodes.split(",")]:
            speed, placement, moved = mesh(tmp, args.model, n, args.tokens, args.runs, args.models_dir)
            ref, per_token = stock(llama, path, n, placement["tensor_split"], args.tokens, args.runs)
            stages = ", ".join(f"{s['layers'][0]}-{s['layers'][1]}" for s in placement["stages"])
            print(
                f"{n} nodes (layers {stages}): mesh {speed:.1f} tok/s = {speed / base:.3f} × solo, "
                f"{speed / ref:.3f} × stock --rpc ({ref:.1f} tok/s); P5 bytes per decoded token through each "
                "worker: mesh " + ", ".join(f"{b:.0f}" for b in moved) + ", stock (each rpc-server, the host's "
                "last) " + ", ".join(f"{b:.0f}" for b in per_token) + f" (2 × n_embd × 4 = {floor})",
                flush=True,
            )
            for rtt in rtts:
                slow, _, _ = mesh(tmp, args.model, n, args.tokens, args.runs, args.models_dir, rtt)
                ref_slow, _ = stock(llama, path, n, placement["tensor_split"], args.tokens, args.runs, rtt)
                stock_floor = 1 / (1 / base + (n - 1) * rtt / 1000)
                chain_floor = 1 / (1 / base + n / 2 * rtt / 1000)
                print(
                    f"{n} nodes, +{rtt:g} ms RTT between nodes: mesh {slow:.1f} tok/s = {slow / chain_floor:.3f} × "
                    f"chained floor ({chain_floor:.1f}), {slow / ref_slow:.3f} × stock --rpc ({ref_slow:.1f} tok/s = "
                    f"{ref_slow / stock_floor:.3f} × its floor {stock_floor:.1f})",
                    flush=True,
                )


if __name__ == "__main__":
    main()

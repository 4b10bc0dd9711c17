"""Serving one model as a pipeline split, on the host: plan, lease, relay, launch, watch, re-plan.

Decide, then do: `placement.plan()` (pure) says which workers take which layers from what the mesh
gossips (capacity, the file on disk, llama.cpp build, RTT maps); this module acts on it:

1. lease an rpc-server on every worker, the last stage first (`rpc_worker.lease`; the worker pre-seeds its
   cache for its layers from its own copy of the GGUF, or fetches just those tensors from this node's data
   plane, so no weight crosses the network at load), each told the stage after it (`NextStage`): its
   rpc-server pushes its output straight there (the hand-off edits in llama.cpp/pin.toml), so a token
   crosses each boundary once — host → worker 1 → … → worker n → host — instead of returning to the host
   between stages;
2. open a data-plane relay per worker (`dataplane.Relay`: 127.0.0.1 → TLS → the worker's rpc-server) and
   HELLO the worker's rpc-server through it: a build speaking another RPC protocol is named before launch;
3. start an rpc-server on this node for the host stage — a CPU-only host is no llama.cpp device,
   and llama.cpp puts the output layer on the last device, so the host's own rpc-server listed last
   keeps the output layer here and only hidden states cross the network — and register it with this
   node's data plane as `<split>-host`, where the last worker hands its output to it (the name is in
   that worker's lease already; its first push comes only once llama-server runs);
4. start llama-server with `--rpc` (workers in plan order, then the local one), `-ts` from the plan and
   MESH_LLM_RPC_PEERS (the name each stage's rpc-server is reached by from the one before: the hand-off
   is used only when every worker opened its peer link; MESH_LLM_NO_HANDOFF=1 in the host's environment turns
   it off, for comparisons);
5. speculate when the model has candidates (`serving/speculate.py`): the draft runs on this host's CPU, never
   over RPC, and the controller keeps it only while measured to be faster; a switch drains and relaunches
   llama-server, the leases and relays stay;
6. watch: llama-server exiting (a dead worker makes it abort), a worker leaving the mesh, or a
   worker's RTT staying above the cap ends the group; everything is torn down and planned again
   after a short pause (the re-plan leaves the far worker out).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from dataclasses import dataclass, replace
from typing import Any

import anyio

from inference.exits import describe_exit
from inference.llama_server import LlamaServer
from inference.placement import Plan, plan
from inference.rpc_server import PROTOCOL_VERSION, RpcServer, RpcSettings, probe, require_compatible
from inference.speculation import Speculation
from mesh_mcp.dataplane.relay import Relay
from mesh_mcp.errors import MeshLLMError, PeerUnreachable, ProtocolError, first_leaf
from mesh_mcp.mesh.rtt import KEEP_EVERY_S, OverCap, as_ms, worse
from mesh_mcp.serving.rpc_worker import Lease, NextStage, lease
from mesh_mcp.serving.run import MeshRun, safe_name
from mesh_mcp.serving.speculate import SpecServing
from mesh_mcp.serving.view import mesh_view

log = logging.getLogger("mesh_llm.split")

REPLAN_PAUSE_S = 2.0
WAIT_FOR_CAPACITY_S = 5.0
WATCH_S = 0.5
RTT_CHECK_S = KEEP_EVERY_S  # a worker's RTT above the cap on 2 checks this far apart: re-plan


@dataclass
class SplitModel(MeshRun):
    force_split: int | None = None
    rtt_cap_ms: float = 80.0
    dataplane_port: int = 0  # this node's data plane: workers without the file fetch their tensors there
    dataplane_targets: dict[str, int] | None = None  # its targets: the last worker hands off to our rpc-server there

    async def run(self) -> None:
        """Serve until cancelled, re-planning whenever the group fails."""
        while True:
            current = await self.plan()
            self.on_state(placement=_describe(current))
            log.info("placement for %s: %s", self.alias, "; ".join(current.reasons))
            if current.kind == "none":
                self.on_state(state="loading", detail="waiting for capacity: " + current.reasons[-1])
                await self.clock.sleep(WAIT_FOR_CAPACITY_S)
                continue
            started = self.clock.monotonic()
            try:
                await self._serve(current)
            except* (MeshLLMError, OSError, TimeoutError) as group:
                exc = first_leaf(group)
                log.warning("split of %s failed: %s", self.alias, exc)
                self.on_state(state="loading", detail=f"re-planning: {exc}", upstream=None, pid=None)
            log.info("split of %s ended after %.0f s; planning again", self.alias, self.clock.monotonic() - started)
            await self.clock.sleep(REPLAN_PAUSE_S)

    async def plan(self) -> Plan:
        """The plan from gossiped state: capacities, files, llama.cpp builds, and every member's RTT map
        (placement takes the worse direction); a member with no RTT either way yet is pinged once here."""
        me = self.mesh.identity.node_id
        unreachable = set()
        *others, mine = mesh_view(self.mesh, self.model_path, self.capacity_bytes, self.clock.time())
        for node in others:
            if node.node_id not in mine.rtt_ms and me not in node.rtt_ms:
                try:
                    with anyio.fail_after(3):
                        rtt = await self.mesh.ping(node.node_id)
                except (PeerUnreachable, ProtocolError, ConnectionError, TimeoutError) as exc:
                    log.info("no RTT to %s (%s): left out of the plan", node.node_id, exc)
                    unreachable.add(node.node_id)
                    continue
                self.mesh.rtt.observe(node.node_id, rtt, self.clock.time())
        view = mesh_view(self.mesh, self.model_path, self.capacity_bytes, self.clock.time())
        nodes = [n for n in view if n.node_id not in unreachable]
        return plan(
            self.alias,
            self.facts,
            nodes,
            requester=me,
            host=me,
            ctx_tokens=self.settings.ctx_per_slot,
            slots=self.settings.slots,
            force_split=self.force_split,
            rtt_cap_ms=self.rtt_cap_ms,
        )

    async def _serve(self, current: Plan) -> None:
        split_id = f"{self.alias[:40]}-{uuid.uuid4().hex[:8]}"
        me = self.mesh.identity.node_id
        workers = [s for s in current.stages if s.node_id != me] if current.kind == "split" else []
        targets = self.dataplane_targets
        async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as tg:
            extra: tuple[str, ...] = ()
            env: tuple[tuple[str, str], ...] = ()
            if current.kind == "split":
                host_target = f"{split_id}-host"  # our rpc-server's name on our data plane, registered below
                handoff = targets is not None and self.dataplane_port and not os.environ.get("MESH_LLM_NO_HANDOFF")
                following = NextStage(me, host_target, self.dataplane_port) if handoff else None
                held: dict[str, Lease] = {}
                for stage in reversed(workers):  # the last stage first: each lease names the stage after it
                    self.on_state(state="loading", detail=f"leasing an rpc-server on {stage.node_id}")
                    held[stage.node_id] = await stack.enter_async_context(
                        lease(
                            self.mesh,
                            stage.node_id,
                            split_id,
                            self.model_path,
                            (stage.first_layer, stage.last_layer),
                            source_port=self.dataplane_port,
                            next_stage=following,
                        )
                    )
                    if following is not None:
                        following = NextStage(stage.node_id, held[stage.node_id].target, _port(held[stage.node_id]))
                endpoints, relays = await self._relays(stack, split_id, workers, held)
                local = RpcServer(
                    self.llama, self.home, RpcSettings(threads=self.threads), name=f"rpc-server-{split_id}"
                )
                await tg.start(local.run)
                if local.endpoint is None or local.port is None:
                    raise MeshLLMError(f"the host's own rpc-server did not start; see {local.log_path}")
                if targets is not None and following is not None:  # the last worker pushes to it from the first token
                    targets[host_target] = local.port
                    stack.callback(targets.pop, host_target, None)
                endpoints.append(local.endpoint)
                ts = ",".join(f"{v:g}" for v in current.tensor_split)
                extra = ("--rpc", ",".join(endpoints), "--tensor-split", ts)
                if workers and following is not None and all(h.peer_link for h in held.values()):
                    names = [held[s.node_id].target for s in workers[1:]] + [host_target]
                    pairs = zip(endpoints[1:], names, strict=True)
                    env = (("MESH_LLM_RPC_PEERS", ",".join(f"{e}={n}" for e, n in pairs)),)
                    log.info("split %s: each stage hands its output to the next over the data plane", split_id)
                else:
                    log.info("split %s: stage outputs return through this node (stock llama.cpp RPC)", split_id)
            else:
                relays = []

            def make(spec: Speculation | None) -> LlamaServer:
                # A draft runs here, on this host's CPU (`-devd none`), never on the RPC devices the split lists
                drafting = spec.args(gpu_layers=0) if spec is not None else ()
                return LlamaServer(
                    llama=self.llama,
                    model_path=self.model_path,
                    alias=self.alias,
                    log_path=self.home / "logs" / f"llama-server-{safe_name(self.alias)}.log",
                    settings=replace(
                        self.settings,
                        gpu_layers=999,
                        extra_args=(*self.settings.extra_args, *extra, *drafting),
                        env=(*self.settings.env, *env),
                        max_start_failures=1,
                    ),
                )

            def on_ready(server: LlamaServer) -> None:
                for node_id, relay in relays:
                    log.info(
                        "split %s: loaded; %.2f MB sent to worker %s over the data plane (weights it did not "
                        "have, and commands)",
                        split_id,
                        relay.counters.to_rpc_server / 1e6,
                        node_id,
                    )
                self.on_state(
                    state="serving",
                    detail=f"{current.kind} over {len(current.stages)} node(s); llama-server pid {server.pid}",
                    upstream=server.base_url,
                    pid=server.pid,
                    **server.template_caps(),
                )

            self.on_state(state="loading", detail=f"starting llama-server ({current.kind})")
            tg.start_soon(self._watch_workers, [s.node_id for s in workers], tg.cancel_scope)
            if self.speculation:
                spec = SpecServing(
                    self.alias,
                    self.speculation,
                    make,
                    on_ready,
                    lambda shown: self.on_state(speculation=shown),
                    on_switching=lambda detail: self.on_state(state="loading", detail=detail, upstream=None),
                    blue_green=False,  # the workers hold one copy of their layers: drain, then relaunch
                    clock=self.clock,
                )
                ended = await spec.run()
            else:
                server = make(None)
                ended = describe_exit(await server.run_once(lambda: on_ready(server)), "llama-server")
            self.on_state(state="loading", detail=f"llama-server {ended.text}; re-planning", upstream=None, pid=None)
            log.warning("llama-server for %s: %s; re-planning. %s", self.alias, ended.text, ended.hint)
            tg.cancel_scope.cancel()

    async def _relays(
        self, stack: contextlib.AsyncExitStack, split_id: str, workers: list[Any], held: dict[str, Lease]
    ) -> tuple[list[str], list[tuple[str, Relay]]]:
        """A started relay per worker, in plan order, each checked with a HELLO: (endpoints, (node id, relay))."""
        endpoints: list[str] = []
        relays: list[tuple[str, Relay]] = []
        for stage in workers:
            got = held[stage.node_id]
            relay = Relay(
                self.mesh.identity,
                lambda: self.mesh.transport.creds,
                got.address,
                got.target,
                expect_node_id=stage.node_id,
                bind_host=None if self.mesh.settings.host in ("0.0.0.0", "::") else self.mesh.settings.host,
            )
            port = await relay.start()
            stack.push_async_callback(relay.close)
            await _check_worker(stage.node_id, port)
            endpoints.append(f"127.0.0.1:{port}")
            relays.append((stage.node_id, relay))
            log.info(
                "split %s: %s holds layers %d-%d (%d tensors already in its cache), via relay 127.0.0.1:%d",
                split_id,
                stage.node_id,
                stage.first_layer,
                stage.last_layer,
                got.seeded,
                port,
            )
        return endpoints, relays

    async def _watch_workers(self, workers: list[str], scope: anyio.CancelScope) -> None:
        """End the group (re-plan) when a worker leaves the mesh, or when its RTT to this node — the
        worse of our live measurement and the one it gossips, as placement reads it — is above
        `rtt_cap_ms` on two consecutive checks `RTT_CHECK_S` apart (the re-plan leaves it out)."""
        me = self.mesh.identity.node_id
        over = OverCap(self.rtt_cap_ms)
        next_rtt_check = self.clock.monotonic() + RTT_CHECK_S
        with self.mesh.keep_measuring(workers):
            while True:
                await self.clock.sleep(WATCH_S)
                records = {r.node_id: r for r in self.mesh.members() if not r.leaving}
                gone = [w for w in workers if w not in records]
                if gone:
                    log.warning("split of %s: worker(s) %s left the mesh; re-planning", self.alias, ", ".join(gone))
                    self.on_state(state="loading", detail=f"worker {gone[0]} left; re-planning", upstream=None)
                    scope.cancel()
                    return
                if self.clock.monotonic() < next_rtt_check:
                    continue
                next_rtt_check = self.clock.monotonic() + RTT_CHECK_S
                seen = {w: (self.mesh.rtt.get(w), as_ms(records[w].rtt).get(me)) for w in workers}
                far = over.check({w: worse(*pair) for w, pair in seen.items()})
                if far:
                    w, (ours, theirs) = far[0], seen[far[0]]
                    log.warning(
                        "split of %s: RTT to worker %s above the %.0f ms cap on %d checks %.0f s apart "
                        "(now: %s measured here, %s gossiped by the worker); re-planning without it",
                        self.alias,
                        w,
                        self.rtt_cap_ms,
                        over.checks,
                        RTT_CHECK_S,
                        _ms(ours),
                        _ms(theirs),
                    )
                    rtt = worse(ours, theirs) or 0.0
                    self.on_state(
                        state="loading", detail=f"worker {w} is {rtt:.0f} ms away; re-planning", upstream=None
                    )
                    scope.cancel()
                    return


async def _check_worker(node_id: str, port: int) -> None:
    """Before launch: HELLO the worker's rpc-server through its relay. Proves the data plane carries
    llama.cpp RPC end to end and that the worker's build speaks a protocol our llama-server accepts
    (a mismatch is reported here by name, not as llama-server aborting at load)."""
    info = await probe("127.0.0.1", port, timeout_s=10)
    require_compatible(PROTOCOL_VERSION, info.version, where=f"the rpc-server on worker {node_id}")
    log.info("worker %s: rpc-server reachable through the data plane, RPC protocol %s", node_id, info.version)


def _port(held: Lease) -> int:
    """The port of a worker's data plane, from the address its lease answered with."""
    return int(held.address.rsplit(":", 1)[1])


def _describe(p: Plan) -> dict[str, Any]:
    return {
        "kind": p.kind,
        "host": p.host,
        "stages": [
            {"node_id": s.node_id, "layers": [s.first_layer, s.last_layer], "bytes": s.bytes, "output": s.output}
            for s in p.stages
        ],
        "tensor_split": list(p.tensor_split),
        "predicted_tok_s": p.predicted_tok_s,
        "reasons": list(p.reasons),
        "missing_bytes": p.missing_bytes,
    }


def _ms(value: float | None) -> str:
    return "none" if value is None else f"{value:.1f} ms"

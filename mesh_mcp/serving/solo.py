"""Serving one model alone on this node: one supervised llama-server (restarted with backoff when it dies), its
state, pid, restarts and what its template can do (call tools, think) reported as they change. A model with
speculation candidates is served through `serving/speculate.py` instead, which restarts its llama-server in the
mode measured to be fastest (blue-green: the model stays served through a switch)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from inference.llama_server import LlamaServer
from inference.speculation import Speculation
from mesh_mcp.serving.run import ModelRun, safe_name
from mesh_mcp.serving.speculate import SpecServing

log = logging.getLogger("mesh_llm.solo")


@dataclass
class SoloModel(ModelRun):
    gpu_layers: int = 0  # -ngl: 999 puts every layer on the GPU(s)

    async def run(self) -> None:
        """Serve until cancelled (the llama-server is terminated and reaped then)."""
        if self.speculation and not self.settings.embeddings:
            await self._speculating()
            return
        server = self._server(None)

        def on_state(state: str, detail: str) -> None:
            caps = server.template_caps()
            self.on_state(
                state=state, detail=detail, upstream=server.base_url, pid=server.pid, restarts=server.restarts, **caps
            )

        server.on_state = on_state
        await server.run()

    def _server(self, spec: Speculation | None) -> LlamaServer:
        extra = spec.args(self.gpu_layers) if spec is not None else ()
        return LlamaServer(
            llama=self.llama,
            model_path=self.model_path,
            alias=self.alias,
            log_path=self.home / "logs" / f"llama-server-{safe_name(self.alias)}.log",
            settings=replace(self.settings, gpu_layers=self.gpu_layers, extra_args=(*self.settings.extra_args, *extra)),
        )

    async def _speculating(self) -> None:
        """Serve through the speculation actor; a server that dies is relaunched with backoff (the controller's
        measurements are kept), and three launches in a row that never became ready fail the model."""
        restarts = 0

        def serving(server: LlamaServer) -> None:
            detail = f"llama-server pid {server.pid} at {server.base_url}"
            caps = server.template_caps()
            self.on_state(
                state="serving", detail=detail, upstream=server.base_url, pid=server.pid, restarts=restarts, **caps
            )

        spec = SpecServing(
            self.alias,
            self.speculation,
            self._server,
            serving,
            lambda shown: self.on_state(speculation=shown),
            clock=self.clock,
        )
        policy, backoff, unready = self.settings, self.settings.backoff_initial_s, 0
        while True:
            before = spec.launched
            report = await spec.run()
            unready = unready + 1 if spec.launched == before else 0
            if unready >= policy.max_start_failures:
                self.on_state(state="failed", detail=f"llama-server {report.text}", upstream=None, pid=None)
                log.error("%s: llama-server %s; giving up. %s", self.alias, report.text, report.hint)
                return
            restarts += 1
            self.on_state(state="loading", detail=f"llama-server {report.text}; restarting", upstream=None, pid=None)
            log.warning("%s: llama-server %s; restarting in %.1f s. %s", self.alias, report.text, backoff, report.hint)
            await self.clock.sleep(backoff)
            backoff = min(backoff * 2, policy.backoff_max_s)

"""Serving one model alone on this node: one supervised llama-server (restarted with backoff when it dies), its
state, pid, restarts and what its template can do (call tools, think) reported as they change. A model with
speculation candidates is served through `serving/speculate.py` instead, which restarts its llama-server in the
mode measured to be fastest (blue-green: the model stays served through a switch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import anyio

from inference.exits import ExitReport
from inference.llama_server import SERVING, LlamaServer
from inference.speculation import Speculation
from inference.supervise import supervise
from mesh_mcp.serving.run import ModelRun, safe_name
from mesh_mcp.serving.speculate import SpecServing


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
        """Serve through the speculation actor, supervised like any llama-server (`inference.supervise`): a server
        that dies is relaunched with backoff (the controller's measurements are kept), and launches that never
        become ready fail the model."""
        restarts = 0

        def serving(server: LlamaServer) -> None:
            detail = f"llama-server pid {server.pid} at {server.base_url}"
            caps = server.template_caps()
            self.on_state(
                state=SERVING, detail=detail, upstream=server.base_url, pid=server.pid, restarts=restarts, **caps
            )

        spec = SpecServing(
            self.alias,
            self.speculation,
            self._server,
            serving,
            lambda shown: self.on_state(speculation=shown),
            clock=self.clock,
        )

        async def attempt(ready: Callable[[], None]) -> ExitReport:
            first = [ready]  # the attempt is ready once, at its first server; a switch is no restart

            def on_serving(server: LlamaServer) -> None:
                serving(server)
                while first:
                    first.pop()()

            spec.on_serving = on_serving
            return await spec.run()

        def restarted() -> int:
            nonlocal restarts
            restarts += 1
            return restarts

        def on_state(state: str, detail: str) -> None:
            self.on_state(state=state, detail=detail, upstream=None, pid=None)

        await supervise(
            noun="llama-server",
            label=f"llama-server for {self.alias}",
            verb="crashed",
            attempt=attempt,
            policy=self.settings,
            on_state=on_state,
            on_restart=restarted,
            log_path=self._server(None).log_path,
            task_status=anyio.TASK_STATUS_IGNORED,
            clock=self.clock,
        )

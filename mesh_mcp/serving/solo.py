"""Serving one model alone on this node: one supervised llama-server (restarted with backoff when it dies), its
state, pid, restarts and what its template can do (call tools, think) reported as they change."""

from __future__ import annotations

from dataclasses import dataclass, replace

from inference.llama_server import LlamaServer
from mesh_mcp.serving.run import ModelRun, safe_name


@dataclass
class SoloModel(ModelRun):
    gpu_layers: int = 0  # -ngl: 999 puts every layer on the GPU(s)

    async def run(self) -> None:
        """Serve until cancelled (the llama-server is terminated and reaped then)."""
        server = LlamaServer(
            llama=self.llama,
            model_path=self.model_path,
            alias=self.alias,
            log_path=self.home / "logs" / f"llama-server-{safe_name(self.alias)}.log",
            settings=replace(self.settings, gpu_layers=self.gpu_layers),
        )

        def on_state(state: str, detail: str) -> None:
            caps = server.template_caps()
            self.on_state(
                state=state, detail=detail, upstream=server.base_url, pid=server.pid, restarts=server.restarts, **caps
            )

        server.on_state = on_state
        await server.run()

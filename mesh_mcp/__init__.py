"""The whole mesh-llm node (the package keeps the design card's name). Its planes are folders:

- `api/`: what clients talk to — the OpenAI/Anthropic API app, routing, the directory seam, the upstream client,
  the console, the HTTP guard and server;
- `mesh/`: membership and transport — identity, tokens, records, gossip, QUIC, the tunnel, the runtime, RTT;
- `dataplane/`: llama.cpp RPC between nodes over authenticated TLS, and the tensor service;
- `serving/`: the serving modes beyond solo (pipeline splits, expert shards) and the workers' halves;
- `mcp/`: the MCP server and finding the local node.

Top level: `node.py` (start-up order and the per-model lifecycle), `state.py`, `cli.py` and the `cmd_*` commands.
It drives `inference/` to build llama.cpp, fetch models and run llama-server.
"""

__version__ = "0.1.0"

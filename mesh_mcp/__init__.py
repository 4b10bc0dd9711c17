"""The whole mesh-llm node (the package keeps the design card's name). Its planes are folders:

- `api/`: what clients talk to — the OpenAI/Anthropic API app, routing, the directory seam, the upstream client,
  the console, the HTTP guard and server;
- `mesh/`: membership and transport — identity, tokens, records, gossip, QUIC, the tunnel, the runtime, RTT;
- `dataplane/`: llama.cpp RPC between nodes over authenticated TLS, and the tensor service;
- `serving/`: how a model is served — the pure planner, the supervisor, one runner per mode (solo, pipeline
  split, expert shards) and the workers' halves;
- `mcp/`: the MCP server (tools, SDK server, HTTP and stdio transports, the node's own mount), finding the local node;
- `testing/`: the seams the project's tests use, shipped (a fake clock, an in-memory mesh network, directory twins).

Top level: `node.py` (start-up order only), `errors.py` (the one error tree), `clock.py` (the injected clock),
`response.py`, `state.py`, `cli.py` and the `cmd_*` commands. It drives `inference/` to build llama.cpp, fetch
models and run llama-server.
"""

__version__ = "0.1.0"

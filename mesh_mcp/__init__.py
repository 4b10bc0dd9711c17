"""The mesh-llm node: CLI, node state, the OpenAI/Anthropic API proxy, the console, and (later) the
mesh transport, gossip and the MCP server. It drives `inference/` to build llama.cpp, fetch models
and run llama-server.
"""

__version__ = "0.1.0"

"""Everything about running models: llama.cpp builds, GGUF facts, hardware, catalog and downloads,
placement plans, and the llama.cpp processes that serve them.

Nothing here knows about the mesh or HTTP APIs; `mesh_mcp` drives these pieces.
"""

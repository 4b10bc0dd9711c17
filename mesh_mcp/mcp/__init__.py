"""The MCP server: tools over a node's HTTP API, its HTTP mount, and finding the local node."""

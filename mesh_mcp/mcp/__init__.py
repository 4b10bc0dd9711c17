"""The MCP server: tools over a node's HTTP API, its HTTP mount, and finding the local node.

`tools` (what each tool takes, checks and returns; no SDK), `server` (`build_server`: the tools on the SDK),
`client` (`HttpTools`: the tools over a node's HTTP API), `http_app` (`McpHttp`: streamable HTTP at /mcp),
`mount` (`McpMount`: the node's own /mcp, loading the SDK lazily), `stdio` (`mesh-llm blackboard --mcp`),
`local` (finding or starting the local node).
"""

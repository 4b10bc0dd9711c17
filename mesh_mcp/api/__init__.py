"""The node's HTTP surface: the OpenAI/Anthropic API app, its router and directory seam, the upstream
client, the console, the HTTP guard and server, and request checks and answer rewrites."""

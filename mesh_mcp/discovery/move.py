"""`MoveTo`: the signal that this node should leave its mesh and join another (the `--mesh-name` race was lost).

Raised by `publisher.NameWatch` inside the running node, caught by the CLI, which stops the node cleanly and runs it
again with `--join` the winner's token. A module of its own so the CLI can name it without importing the transports.
"""

from __future__ import annotations


class MoveTo(Exception):
    """Join the mesh `token` names; `why` says which race was lost."""

    def __init__(self, token: str, why: str) -> None:
        super().__init__(why)
        self.token, self.why = token, why

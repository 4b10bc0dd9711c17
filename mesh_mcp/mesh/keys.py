"""The mesh secret through its epochs: which secrets a peer may prove, an owner's key rotation and eviction, the
signed statements and new secret handed to each member on its own connection, and adopting (or refusing) one
handed to us.

Streams it serves:
- `rotate`: owner-signed rotation statements and the new secret (`rotation.py`), over this connection only;
  refused and logged unless every statement checks out;
- `evicted`: the signed statements that removed this node (it stops rejoining and says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio

from mesh_mcp.errors import ConfigError, PeerUnreachable, ProtocolError, RotationRefused

from . import meshfile, rotation, wire
from .credentials import Credentials
from .liveness import SEND_TIMEOUT_S
from .meshfile import MeshConfig
from .transport import PeerConnection
from .wire import encode_json, read_json

if TYPE_CHECKING:
    from .runtime import Mesh

log = logging.getLogger("mesh_llm.mesh")

NOTICE_TIMEOUT_S = 2.0  # an evicted node gets this long to read why before its connection closes


def _node_id(text: str, option: str) -> str:
    """A node id given by the operator (16 hex characters, as `/api/status` shows them)."""
    node_id = text.strip().lower() if isinstance(text, str) else ""
    if len(node_id) != 16 or node_id.strip("0123456789abcdef"):
        raise ConfigError(f"{option} takes a node id: 16 hex characters, as in the peers of `/api/status`")
    return node_id


class Keys:
    """The mesh's secret and who may prove it; `Mesh` delegates to it. `removed`: an owner evicted this node (it
    stops dialling the mesh)."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.evicted = frozenset(mesh.config.evicted)
        self.removed = False

    def credentials(self, config: MeshConfig) -> Credentials:
        return Credentials(
            self.mesh.identity,
            config.mesh_id,
            config.secret,
            self._accepted,
            epoch=config.epoch,
            previous=config.previous_secrets,
            evicted=frozenset(config.evicted),
        )

    def _accepted(self, node_id: str | None) -> tuple[bytes, ...]:
        """Secrets a peer may prove: the current one; old ones only from known members; none from evicted nodes
        (they are known no more, whatever record of theirs gossip still holds)."""
        if node_id is not None and node_id in self.evicted:
            return ()
        gossip = self.mesh.gossip
        known = node_id is not None and gossip is not None and gossip.record(node_id) is not None
        return self.mesh.config.accepted_secrets if known else (self.mesh.config.secret,)

    # --- as an owner --------------------------------------------------------------------------------

    def rotate(self, evict: Iterable[str] = (), add_owners: Iterable[str] = ()) -> str:
        """As an owner: a new mesh secret at the next epoch, signed (old tokens stop admitting new nodes); each
        member gets it over its own connection, evicted nodes never, and they are disconnected. ConfigError in
        words for a non-owner, a malformed or unknown node id. Returns the new invite token."""
        mesh = self.mesh
        evicted = tuple(_node_id(n, "--evict") for n in evict)
        keys = tuple(self._public_key(_node_id(n, "--add-owner")) for n in add_owners)
        config, _ = meshfile.owner_rotate(mesh.config, mesh.identity.key, evict=evicted, add_owners=keys)
        self.adopt(config)
        members = {r.node_id for r in mesh.members()} | set(mesh.transport.connections)  # clients too
        for node_id in members - {mesh.identity.node_id} - set(config.evicted):
            mesh.spawn(self._push_secret_to, node_id)
        return mesh.invite_token()

    def _public_key(self, node_id: str) -> bytes:
        record = self.mesh.gossip.record(node_id) if self.mesh.gossip is not None else None
        if record is None or record.role == "client":
            raise ConfigError(
                f"node {node_id} is not a member this node knows, so its key is unknown: an owner must be a "
                "member (not a client) that is in the mesh now; see the peers in `/api/status`"
            )
        return record.public_key

    def adopt(self, config: MeshConfig) -> None:
        """Make `config` (a verified rotation) this node's: saved, proven with, and evictions acted on."""
        mesh = self.mesh
        newly = [n for n in config.evicted if n not in self.evicted]
        meshfile.save(mesh.home, config)
        mesh.config = config
        self.evicted = frozenset(config.evicted)
        mesh.transport.creds = self.credentials(config)
        if mesh.joined.is_set():
            mesh.state.set_info(invite_token=mesh.invite_token())
        log.info("mesh secret is now epoch %d", config.epoch)
        if not (newly and mesh.spawn(self._evict, newly)):  # tell them first: gossip's ban closes their connections
            self._ban()

    def _ban(self) -> None:
        mesh = self.mesh
        if mesh.gossip is not None:
            mesh.gossip.ban(mesh.config.evicted, mesh.clock.time())
            mesh.log_events()

    async def _evict(self, node_ids: list[str]) -> None:
        """Tell evicted nodes why (the signed statements: they can check them, nobody can forge them), close
        their connections with a reason, then drop them from membership for good (a bounded few seconds)."""
        chain = [rotation.to_hex(r) for r in self.mesh.config.rotations]

        async def tell(node_id: str, conn: PeerConnection) -> None:
            # Each of its connections is told: not reachable, or no answer, it is closed all the same.
            with anyio.move_on_after(NOTICE_TIMEOUT_S), contextlib.suppress(PeerUnreachable, ProtocolError):
                reader, writer = await conn.open_stream({"t": "evicted", "chain": chain})
                writer.write_eof()
                try:
                    await read_json(reader)
                except ConnectionError as exc:  # it went away while reading the notice
                    raise PeerUnreachable(f"node {node_id}: {exc}") from exc
            conn.close(error_code=0x1, reason_phrase="removed from the mesh by an owner")

        try:
            async with anyio.create_task_group() as tg:
                for node_id in node_ids:
                    conns = list(self.mesh.transport.connections.get(node_id, ()))
                    if conns:
                        log.warning("node %s was evicted from the mesh: closing its connection(s)", node_id)
                    for conn in conns:
                        tg.start_soon(tell, node_id, conn)
        finally:
            self._ban()

    # --- handing the secret on ----------------------------------------------------------------------

    def _rotate_fields(self, node_id: str) -> dict[str, Any] | None:
        """The `rotate` stream's fields for `node_id`: the kept statements and the current secret, or None when
        there is nothing to hand it (an evicted node, or a mesh never rotated since owners existed)."""
        if node_id in self.evicted:
            return None
        chain = [rotation.to_hex(r) for r in self.mesh.config.rotations]
        return {"chain": chain, "secret": self.mesh.config.secret.hex()} if chain else None

    async def _push_secret_to(self, node_id: str) -> None:
        """The statements and the current secret on this member's own authenticated, encrypted connection (never
        gossiped), dialled if need be."""
        if (fields := self._rotate_fields(node_id)) is None:
            return
        try:
            with anyio.fail_after(SEND_TIMEOUT_S * 2):
                reader, writer = await self.mesh.dial(node_id, "rotate", **fields)
                writer.write_eof()
                await self._answer(node_id, reader)
        except (PeerUnreachable, TimeoutError, ProtocolError) as exc:  # not reached; no answer; a bad one
            log.warning("could not give the new mesh secret to %s: %s", node_id, exc)

    async def relay(self, conn: PeerConnection, epoch: int) -> None:
        """A peer introduced itself at an older epoch: give it the signed statements since and the secret, on the
        connection it introduced itself on, unless it was evicted or is too far behind for the statements kept."""
        assert conn.peer is not None
        who = conn.peer.node_id
        if who in self.evicted:
            return
        if self.mesh.config.chain_since(epoch) is None:
            log.info(
                "member %s is at epoch %d, too far behind this mesh's %d to catch up",
                who,
                epoch,
                self.mesh.config.epoch,
            )
            return
        if (fields := self._rotate_fields(who)) is None:
            return
        with contextlib.suppress(PeerUnreachable, TimeoutError, ProtocolError), anyio.fail_after(SEND_TIMEOUT_S * 2):
            reader, writer = await conn.open_stream({"t": "rotate", **fields})
            writer.write_eof()
            await self._answer(who, reader)

    async def _answer(self, node_id: str, reader: asyncio.StreamReader) -> None:
        """The member's answer to a `rotate` stream: whether it took the statements (logged if it refused)."""
        try:
            reply = await read_json(reader)
        except ConnectionError as exc:  # it went away before answering
            raise PeerUnreachable(f"node {node_id}: {exc}") from exc
        if reply.get("t") == "rotate-refused":
            log.warning("member %s refused the key rotation: %s", node_id, str(reply.get("reason"))[:200])

    # --- handed to us -------------------------------------------------------------------------------

    def _parse_chain(self, header: dict[str, Any]) -> tuple[rotation.Rotation, ...]:
        items = wire.field(header, "chain", list, rotation.MAX_CHAIN)
        return tuple(rotation.from_hex(item) for item in items)

    async def on_rotate(
        self, conn: PeerConnection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Statements and a secret from a peer: adopted only if every new statement checks out (this mesh,
        epoch exactly one more each, signed by an owner as of the epoch before, the secret matching the last
        one's hash). Anything else is refused and logged with the peer's node id; nothing changes."""
        assert conn.peer is not None
        peer, current = conn.peer.node_id, self.mesh.config
        try:
            chain = self._parse_chain(header)
            if chain and current.rotations and chain[-1] == current.rotations[-1]:
                config = current  # this epoch's statement, which we have (two members told us at once)
            else:
                secret = bytes.fromhex(wire.field(header, "secret", str, 64))
                config = meshfile.advance(current, chain, secret)
        except (RotationRefused, ValueError, ProtocolError) as exc:
            log.warning("refused a key rotation from node %s: %s", peer, exc)
            writer.write(encode_json({"t": "rotate-refused", "reason": str(exc)[:300]}))
            writer.write_eof()
            return
        writer.write(encode_json({"t": "rotated", "epoch": config.epoch}))
        writer.write_eof()
        if config is self.mesh.config:
            return
        if self.mesh.identity.node_id in config.evicted:  # a valid statement removing us: never adopt its secret
            self._was_evicted(peer, config.rotations[-1])
            return
        self.adopt(config)
        signer = config.rotations[-1].signer_id
        log.info("key rotation to epoch %d by owner %s, received from %s", config.epoch, signer, peer)

    async def on_evicted(
        self, conn: PeerConnection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """An eviction notice: believed only if signed statements newer than our epoch evict this node."""
        assert conn.peer is not None
        config = self.mesh.config
        try:
            chain = tuple(r for r in self._parse_chain(header) if r.epoch > config.epoch)
            rotation.check_chain(chain, mesh_id=config.mesh_id, epoch=config.epoch, owners=config.owners)
            mine = [r for r in chain if self.mesh.identity.node_id in r.evicted]
            if not mine:
                raise RotationRefused("the statements do not evict this node")
        except (RotationRefused, ProtocolError) as exc:
            log.warning("refused an eviction notice from node %s: %s", conn.peer.node_id, exc)
            return
        finally:
            writer.write(encode_json({"t": "ok"}))
            writer.write_eof()
        self._was_evicted(conn.peer.node_id, mine[-1])

    def _was_evicted(self, peer: str, statement: rotation.Rotation) -> None:
        if self.removed:
            return
        self.removed = True
        log.error(
            "this node was removed from mesh %s by its owner %s (key rotation to epoch %d, told by %s): members "
            "refuse it from now on; ask an owner of the mesh if that was a mistake",
            self.mesh.config.mesh_id_hex[:8],
            statement.signer_id,
            statement.epoch,
            peer,
        )

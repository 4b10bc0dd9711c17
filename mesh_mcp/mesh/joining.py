"""Getting into the mesh and back: joining through invite tokens, rejoining when alone (the token's addresses and
the members last known, kept in `peers.json`), and the introduction on every new connection.

Stream it serves:
- `record`: a newly connected peer introduces itself (signed record both ways, mesh epochs so a member that
  missed a key rotation gets the owner-signed statements and the current secret, and the owners, for a node whose
  invite token did not name them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

import anyio

from mesh_mcp.errors import HandshakeRefused, JoinRefused, MeshLLMError, PeerUnreachable, ProtocolError

from . import meshfile, rotation, wire
from .records import NodeRecord, from_wire, to_wire, verify
from .transport import PeerConnection
from .wire import encode_json, read_json

if TYPE_CHECKING:
    from .runtime import Mesh

log = logging.getLogger("mesh_llm.mesh")

JOIN_RETRY_S = (0.5, 1, 2, 4, 8)
JOIN_REFUSALS = 3  # refused this many times, a join gives up: the process stops, saying why
REJOIN_S = 2.0
PEERS_FILE = "peers.json"  # members last known, dialled again after a restart


class Joiner:
    """How this node gets into its mesh and stays in it; `Mesh` runs `join_all` and `rejoin`. `joining`: join
    tasks still trying."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.joining = 0
        self._saved_peers: list[str] = []
        self._rejoin_refusals: dict[str, str] = {}  # address → last refusal code logged (said once)
        self._rejoin_round = 0  # rejoin rounds so far: where the next round starts in the address list

    # --- joining ------------------------------------------------------------------------------------

    async def join_all(self) -> None:
        """Join through every token at once. If none got in and one was refused, stop the node (JoinRefused,
        the first refusal in words); if they were only unreachable, `rejoin` keeps trying."""
        refusals: list[tuple[tuple[str, ...], HandshakeRefused]] = []

        async def one(addresses: tuple[str, ...]) -> None:
            try:
                refused = await self._join(addresses)
            finally:
                self.joining -= 1
            if refused is not None:
                refusals.append((addresses, refused))

        async with anyio.create_task_group() as tg:
            for token in self.mesh.settings.joins:
                tg.start_soon(one, token.addresses)
        if refusals and not self.mesh.joined.is_set():
            addresses, refused = refusals[0]
            raise JoinRefused(f"could not join the mesh through {', '.join(addresses)}: {refused}")

    async def _join(self, addresses: tuple[str, ...]) -> HandshakeRefused | None:
        """Dial the token's addresses until one lets us in (retrying unreachable ones a few times); a node
        refused `JOIN_REFUSALS` times gives up: the refusal is returned."""
        refused = 0
        for attempt, delay in enumerate((*JOIN_RETRY_S, None)):
            try:
                conn = await self._introduce_at(addresses)
                assert conn.peer is not None
                self.on_joined()
                log.info("joined the mesh through %s (%s)", conn.peer.node_id, conn.remote)
                return None
            except HandshakeRefused as exc:
                refused += 1
                if refused >= JOIN_REFUSALS or delay is None:
                    return exc
                log.warning("join attempt %d refused: %s; trying again in %ss", attempt + 1, exc, delay)
            except PeerUnreachable as exc:
                if delay is None:
                    log.error("could not join through %s: %s", ", ".join(addresses), exc)
                    return None
                log.warning("join attempt %d failed (%s); retrying in %ss", attempt + 1, exc, delay)
            except MeshLLMError as exc:  # a peer that speaks garbage: retrying will not help
                log.error("could not join through %s: %s", ", ".join(addresses), exc)
                return None
            await self.mesh.clock.sleep(delay)
        return None

    def on_joined(self) -> None:
        """This node is a member: its mesh.toml is written now (never for a join that was refused), and its
        invite token may be shown (the node waits for `joined`, prints it, then puts it in its status)."""
        mesh = self.mesh
        if mesh.joined.is_set():
            return
        if mesh.settings.joins:
            meshfile.save(mesh.home, mesh.config)
        mesh.joined.set()

    # --- rejoining ----------------------------------------------------------------------------------

    async def rejoin(self) -> None:
        """Alone in the mesh (everyone we knew left or died, or we restarted): dial the invite
        token's addresses and the members we last knew, until someone answers."""
        mesh = self.mesh
        assert mesh.gossip is not None
        while True:
            await mesh.clock.sleep(REJOIN_S)
            now = mesh.clock.time()
            alive = [r for r in mesh.gossip.alive(now) if r.node_id != mesh.identity.node_id]
            if alive:
                self._save_peers(alive)
                continue
            if self.joining or mesh.keys.removed:
                continue  # the join says how it went; an evicted node has nobody to dial
            known = [a for t in mesh.settings.joins for a in t.addresses] + self._load_peers()
            candidates = list(dict.fromkeys(a for a in known if a not in mesh.addresses))
            # Each round starts one address further: one that answers but leaves us alone (a client, a node
            # cut off itself) must not stand in front of the others for ever.
            self._rejoin_round += 1
            shift = self._rejoin_round % len(candidates) if candidates else 0
            for address in candidates[shift:] + candidates[:shift]:
                try:
                    await self._introduce_at((address,))
                except HandshakeRefused as exc:
                    self._rejoin_refused(address, exc)
                    if mesh.keys.removed:
                        break
                    continue
                except PeerUnreachable:
                    continue
                except MeshLLMError as exc:  # it answered with garbage: the next address
                    log.debug("could not rejoin through %s: %s", address, exc)
                    continue
                self._rejoin_refusals.clear()
                self.on_joined()
                log.info("rejoined the mesh through %s", address)
                break

    def _rejoin_refused(self, address: str, exc: HandshakeRefused) -> None:
        """A member refused us while we dialled it to rejoin: say so once per address and reason."""
        if exc.code == "evicted":
            self.mesh.keys.removed = True
            log.error("%s (told by %s); this node stops dialling the mesh", exc, address)
        elif self._rejoin_refusals.get(address) != exc.code:
            log.warning("could not rejoin the mesh through %s: %s", address, exc)
        self._rejoin_refusals[address] = exc.code

    def _save_peers(self, alive: list[NodeRecord]) -> None:
        addresses = sorted({a for r in alive if r.role != "client" for a in r.addresses})[:64]
        if addresses != self._saved_peers:
            self._saved_peers = addresses
            with contextlib.suppress(OSError):
                (self.mesh.home / PEERS_FILE).write_text(json.dumps(addresses))

    def _load_peers(self) -> list[str]:
        try:
            data = json.loads((self.mesh.home / PEERS_FILE).read_text())
        except (OSError, ValueError):
            return []
        return [a for a in data if isinstance(a, str)][:64] if isinstance(data, list) else []

    # --- introductions ------------------------------------------------------------------------------

    async def _introduce_at(self, addresses: tuple[str, ...]) -> PeerConnection:
        """Dial `addresses` (a token's, or members last known: there is no node id to dial by yet) and exchange
        records. `PeerUnreachable` when no address answers or the connection fails before the exchange is done,
        `HandshakeRefused` when a member refuses us, another `MeshLLMError` for a peer that speaks garbage."""
        try:
            conn = await self.mesh.transport.connect_any(None, addresses)
        except PeerUnreachable:
            raise
        except OSError as exc:  # the transport's "no answer" / "cannot reach" for each address
            raise PeerUnreachable(str(exc)) from exc
        reader, writer = await conn.open_stream({"t": "record", **self.introduction()})
        writer.write_eof()
        try:
            reply = await read_json(reader)
        except ConnectionError as exc:  # the connection failed while we waited for its record
            raise PeerUnreachable(f"{conn.remote}: {exc}") from exc
        self._learn(conn, reply)
        return conn

    def introduction(self) -> dict[str, Any]:
        mesh = self.mesh
        assert mesh.gossip is not None
        owners = [o.hex() for o in mesh.config.owners]
        return {"record": to_wire(mesh.gossip.me), "epoch": mesh.config.epoch, "owners": owners}

    def _learn(self, conn: PeerConnection, msg: dict[str, Any]) -> None:
        mesh = self.mesh
        assert mesh.gossip is not None and conn.peer is not None
        record = from_wire(msg.get("record"))
        verify(record)
        if record.node_id != conn.peer.node_id:
            raise ProtocolError("a peer introduced itself with another node's record")
        mesh.send(mesh.gossip.add_peer(record, mesh.clock.time()))
        mesh.log_events()
        epoch = wire.field(msg, "epoch", int)
        if not mesh.config.owners:
            self._learn_owners(conn.peer.node_id, msg.get("owners"))
        if epoch < mesh.config.epoch:
            mesh.spawn(mesh.keys.relay, conn, epoch)

    def _learn_owners(self, peer: str, owners: object) -> None:
        """A node that joined through a token naming no owners (protocol 1) takes them from the first member
        that tells it (trust on first use), so later rotations can be checked."""
        mesh = self.mesh
        if not isinstance(owners, list) or not 1 <= len(owners) <= rotation.MAX_OWNERS:
            return
        try:
            keys = tuple(bytes.fromhex(o) for o in owners if isinstance(o, str) and len(o) == 64)
            config = meshfile.learn_owners(mesh.config, keys)
        except (ValueError, MeshLLMError):
            return
        if config == mesh.config:
            return
        mesh.config = config
        if mesh.joined.is_set():
            meshfile.save(mesh.home, config)
        log.info("mesh owners learned from %s: %s", peer, ", ".join(config.owner_ids))

    async def on_record(
        self, conn: PeerConnection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(encode_json(self.introduction()))
        writer.write_eof()
        self._learn(conn, header)

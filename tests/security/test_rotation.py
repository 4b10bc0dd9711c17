"""Rotation is owned: only an owner's signed statement moves the mesh secret, by exactly one epoch; forgeries,
replays, jumps, another mesh's statements and mismatched secrets are refused (pure), and across real node
processes a hostile member's forged rotations change nothing while `rotate-key --evict` removes nodes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh_mcp.errors import ConfigError, HandshakeRefused, InvalidToken, RotationRefused
from mesh_mcp.mesh import handshake as hs
from mesh_mcp.mesh import meshfile, rotation, tokens
from mesh_mcp.mesh.credentials import Credentials
from mesh_mcp.mesh.identity import Identity, load_or_create, node_id_for
from mesh_mcp.mesh.meshfile import MeshConfig
from mesh_mcp.mesh.quic import MeshTransport
from mesh_mcp.mesh.records import public_key_bytes
from mesh_mcp.mesh.wire import read_json
from tests.harness import NodeProcess
from tests.test_meshfile import counter_rng

Spawn = Callable[..., NodeProcess]
OWNER = Ed25519PrivateKey.generate()
OWNER_PUB = public_key_bytes(OWNER)
STRANGER = Ed25519PrivateKey.generate()


def owned() -> MeshConfig:
    return meshfile.create(counter_rng(), owner=OWNER_PUB)


def member_of(cfg: MeshConfig) -> MeshConfig:
    """What a node that joined with cfg's invite token holds."""
    return meshfile.from_token(tokens.decode(tokens.encode(meshfile.to_token(cfg, ("127.0.0.1:7000",)))))


# --- the statement, pure -------------------------------------------------------------------------------------


def test_an_owner_rotation_reaches_a_member_with_its_secret() -> None:
    cfg = owned()
    member = member_of(cfg)
    assert member.owners == (OWNER_PUB,)  # the token names the owner
    rotated, statement = meshfile.owner_rotate(cfg, OWNER, evict=("ab" * 8,))
    assert rotated.epoch == 2 and statement.epoch == 2 and statement.evicted == ("ab" * 8,)
    assert statement.secret_sha256 == rotation.secret_hash(rotated.secret)
    assert rotated.secret.hex() not in rotation.to_hex(statement)  # the statement carries a hash, not the secret
    after = meshfile.advance(member, rotated.rotations, rotated.secret)
    assert (after.epoch, after.secret, after.owners, after.evicted) == (2, rotated.secret, (OWNER_PUB,), ("ab" * 8,))
    assert after.previous_secrets == (cfg.secret,)


def test_a_member_that_missed_rotations_catches_up_through_the_chain() -> None:
    cfg = owned()
    member = member_of(cfg)
    for _ in range(3):
        cfg, _ = meshfile.owner_rotate(cfg, OWNER)
    assert cfg.chain_since(1) == cfg.rotations and len(cfg.rotations) == 3
    after = meshfile.advance(member, cfg.rotations, cfg.secret)
    assert after.epoch == 4 and after.secret == cfg.secret
    # one rotation behind: the statements it has seen are skipped, the new one checked
    one_behind = meshfile.advance(member, cfg.rotations[:1], _secret_of(cfg, member, 2))
    assert one_behind.epoch == 2
    assert meshfile.advance(one_behind, cfg.rotations, cfg.secret).epoch == 4


def _secret_of(final: MeshConfig, start: MeshConfig, epoch: int) -> bytes:
    # epoch e's secret is previous_secrets[final.epoch - e - 1]
    return final.previous_secrets[final.epoch - epoch - 1]


def _forge(cfg: MeshConfig, key: Ed25519PrivateKey, epoch: int, secret: bytes, mesh_id: bytes | None = None) -> Any:
    return rotation.sign(key, mesh_id or cfg.mesh_id, epoch, secret, (public_key_bytes(key),))


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda c: _forge(c, STRANGER, c.epoch + 1, b"x" * 32), "forgery.*not an owner"),
        (lambda c: _forge(c, STRANGER, 4294967295, b"x" * 32), "jump"),
        (lambda c: _forge(c, OWNER, c.epoch + 2, b"x" * 32), "jump"),
        (lambda c: _forge(c, OWNER, c.epoch, b"x" * 32), "replay"),
        (lambda c: _forge(c, OWNER, c.epoch + 1, b"x" * 32, b"\x09" * 16), "another mesh"),
        (lambda c: _forge(c, OWNER, c.epoch + 1, b"y" * 32), "does not match the signed hash"),
        (
            lambda c: dataclasses.replace(
                _forge(c, OWNER, c.epoch + 1, b"x" * 32), owners=(public_key_bytes(STRANGER),)
            ),
            "bad signature",
        ),
    ],
    ids=["non-owner", "epoch-max", "epoch+2", "replay", "other-mesh", "wrong-secret", "tampered"],
)
def test_bad_rotations_are_refused_and_change_nothing(make: Callable[[MeshConfig], Any], why: str) -> None:
    cfg = meshfile.owner_rotate(owned(), OWNER)[0]  # epoch 2
    before = dataclasses.replace(cfg)
    with pytest.raises(RotationRefused, match=why):
        meshfile.advance(cfg, (make(cfg),), b"x" * 32)
    assert cfg == before


def test_a_replayed_old_statement_is_refused() -> None:
    cfg = owned()
    first, old = meshfile.owner_rotate(cfg, OWNER)
    second, _ = meshfile.owner_rotate(first, OWNER)
    with pytest.raises(RotationRefused, match="replay"):
        meshfile.advance(second, (old,), first.secret)


def test_named_owners_may_rotate_and_removed_ones_may_not() -> None:
    b = Ed25519PrivateKey.generate()
    cfg, _ = meshfile.owner_rotate(owned(), OWNER, add_owners=(public_key_bytes(b),))
    member = member_of(owned())
    member = meshfile.advance(member, cfg.rotations, cfg.secret)
    assert set(member.owners) == {OWNER_PUB, public_key_bytes(b)}
    cfg2, _ = meshfile.owner_rotate(cfg, b, evict=(node_id_for(OWNER_PUB),))  # b removes the creator
    member = meshfile.advance(member, cfg2.rotations, cfg2.secret)
    assert member.owners == (public_key_bytes(b),) and node_id_for(OWNER_PUB) in member.evicted
    with pytest.raises(ConfigError, match="not an owner"):
        meshfile.owner_rotate(cfg2, OWNER)


def test_a_non_owner_cannot_rotate_and_is_told_who_can() -> None:
    member = member_of(owned())
    with pytest.raises(ConfigError, match=f"not an owner.*{node_id_for(OWNER_PUB)}"):
        meshfile.owner_rotate(member, STRANGER)
    with pytest.raises(ConfigError, match="cannot evict itself"):
        meshfile.owner_rotate(owned(), OWNER, evict=(node_id_for(OWNER_PUB),))


def test_everything_a_statement_carries_is_bounded() -> None:
    cfg = owned()
    many = tuple(Ed25519PrivateKey.generate() for _ in range(rotation.MAX_OWNERS))
    with pytest.raises(ConfigError, match="at most"):
        meshfile.owner_rotate(cfg, OWNER, add_owners=tuple(public_key_bytes(k) for k in many))
    with pytest.raises(ConfigError, match="evicts at most"):
        meshfile.owner_rotate(cfg, OWNER, evict=tuple(f"{i:016x}" for i in range(rotation.MAX_EVICT + 1)))
    with pytest.raises(RotationRefused, match="bounded size"):
        rotation.from_hex("00" * (rotation.MAX_HEX // 2 + 1))
    statement = meshfile.owner_rotate(cfg, OWNER)[1]
    for damaged in (rotation.to_hex(statement)[:-2], rotation.to_hex(statement) + "00", "zz", 7):
        with pytest.raises(RotationRefused):
            rotation.from_hex(damaged)
    assert rotation.from_hex(rotation.to_hex(statement)) == statement
    chain = (statement,) * (rotation.MAX_CHAIN + 1)
    with pytest.raises(RotationRefused, match="at most"):
        rotation.check_chain(chain, mesh_id=cfg.mesh_id, epoch=1, owners=cfg.owners)
    # the remembered evictions are bounded too, oldest forgotten first
    for i in range(meshfile.MAX_EVICTED // rotation.MAX_EVICT + 1):
        cfg, _ = meshfile.owner_rotate(cfg, OWNER, evict=tuple(f"{i:08x}{j:08x}" for j in range(rotation.MAX_EVICT)))
    assert len(cfg.evicted) == meshfile.MAX_EVICTED and len(cfg.rotations) == rotation.MAX_CHAIN


def test_a_node_that_does_not_know_its_owners_refuses_every_rotation() -> None:
    cfg = dataclasses.replace(member_of(owned()), owners=())
    rotated, _ = meshfile.owner_rotate(owned(), OWNER)
    with pytest.raises(RotationRefused, match="does not know its mesh's owners"):
        meshfile.advance(cfg, rotated.rotations, rotated.secret)
    learned = meshfile.learn_owners(cfg, (OWNER_PUB,))
    assert meshfile.advance(learned, rotated.rotations, rotated.secret).epoch == 2
    assert meshfile.learn_owners(learned, (public_key_bytes(STRANGER),)) == learned  # first told wins


def test_mesh_toml_keeps_owners_evictions_and_statements(tmp_path: Path) -> None:
    cfg, _ = meshfile.owner_rotate(owned(), OWNER, evict=("cd" * 8,))
    meshfile.save(tmp_path, cfg)
    assert meshfile.load(tmp_path) == cfg
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / meshfile.MESH_FILE).write_text(
        f'version = 1\nmesh_id = "{"01" * 16}"\nepoch = 2\nsecret = "{"02" * 32}"\nprevious_secrets = []\n'
    )
    os.chmod(legacy / meshfile.MESH_FILE, 0o600)
    old = meshfile.load(legacy)
    assert old is not None and old.owners == () and old.evicted == () and old.rotations == ()


def test_tokens_carry_owners_and_old_tokens_still_decode() -> None:
    cfg = owned()
    token = meshfile.to_token(cfg, ("127.0.0.1:7000",))
    assert tokens.decode(tokens.encode(token)).owners == (OWNER_PUB,)
    # a protocol-1 token (no owner list) made by an older mesh-llm
    v1 = bytes([1]) + cfg.mesh_id + cfg.secret + (1).to_bytes(4, "big") + b"\x01\x0e127.0.0.1:7000"
    old = tokens.decode(tokens._wrap(v1))
    assert old.protocol == 1 and old.owners == () and old.secret == cfg.secret
    with pytest.raises(InvalidToken, match="malformed"):
        tokens.decode(tokens._wrap(bytes([2]) + v1[1:] + b"\x09"))  # 9 owners


def test_handshake_refusals_name_a_code_and_read_as_sentences() -> None:
    me, them = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pub = public_key_bytes(them)
    t = hs.transcript(b"m" * 16, b"a" * 32, b"b" * 32, public_key_bytes(me), pub)
    old, new = b"o" * 32, b"n" * 32
    auth = hs.proof("auth", them, pub, old, t)
    with pytest.raises(HandshakeRefused) as info:
        hs.check_auth(auth, t, accepted=(new,), previous=(old,))
    assert info.value.code == "old-token"
    with pytest.raises(HandshakeRefused) as info:
        hs.check_auth(auth, t, accepted=(new,), previous=())
    assert info.value.code == "bad-secret"
    with pytest.raises(HandshakeRefused) as info:
        hs.check_auth(auth, t, accepted=(old,), evicted=frozenset({node_id_for(pub)}))
    assert info.value.code == "evicted"
    assert hs.check_auth(auth, t, accepted=(old,)).node_id == node_id_for(pub)
    assert "epoch 7" in str(hs.refusal_error(hs.refused("authentication failed", "old-token", 7)))
    assert "another mesh" in str(hs.refusal_error(hs.refused("authentication failed", "other-mesh", 7)))
    assert "epoch" not in str(hs.refusal_error(hs.refused("authentication failed", "other-mesh", 7)))
    assert "removed" in str(hs.refusal_error(hs.refused("authentication failed", "evicted")))
    assert "wrong secret" in str(hs.refusal_error(hs.refused("authentication failed", "bad-secret")))
    odd = hs.refusal_error({"type": "refused", "reason": "\x1b[31mred\x07", "code": "nonsense", "epoch": -1})
    assert odd.code == "unknown" and "\x1b" not in str(odd) and odd.epoch is None


# --- across real node processes ------------------------------------------------------------------------------


def mesh_llm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh_mcp.cli", *args], capture_output=True, text=True, timeout=60)


def start(spawn: Spawn, name: str, ip: str, *args: str) -> NodeProcess:
    return spawn("--mesh-host", ip, "--client", *args, name=name)


def token_of(node: NodeProcess, timeout: float = 60) -> str:
    return str(node.wait_for("invite token", lambda s: bool(s.get("invite_token")), timeout)["invite_token"])


def epoch_of(node: NodeProcess) -> int:
    return tokens.decode(node.status()["invite_token"]).epoch


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def node_key(node: NodeProcess) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key((node.home / "node.key").read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


async def _send_rotations(
    identity: Identity, token: tokens.InviteToken, headers: list[dict[str, Any]], secret: bytes | None = None
) -> list[dict[str, Any]]:
    """As a member holding `token`'s secret: one `rotate` stream per header; the answers."""
    proof = secret or token.secret
    creds = Credentials(identity, token.mesh_id, proof, lambda _: (proof,))
    replies: list[dict[str, Any]] = []
    refused: HandshakeRefused | None = None
    rogue = MeshTransport(creds, {}, host="127.0.0.9")
    async with anyio.create_task_group() as tg:
        await tg.start(rogue.run)
        try:
            conn = await rogue.connect(token.addresses[0])
        except HandshakeRefused as exc:
            refused = exc
            headers = []
        for header in headers:
            reader, writer = await conn.open_stream(header)
            writer.write_eof()
            with anyio.fail_after(30):
                try:
                    replies.append(await read_json(reader))
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    replies.append({"t": "reset", "error": str(exc)})
        tg.cancel_scope.cancel()
    if refused is not None:
        raise refused
    return replies


@pytest.mark.slow
def test_a_hostile_member_cannot_rotate_and_the_owner_still_can(spawn: Spawn, tmp_path: Path) -> None:
    owner = start(spawn, "owner", "127.0.0.2")
    token = tokens.decode(token_of(owner))
    saved = (owner.home / "mesh.toml").read_bytes()
    hostile = load_or_create(tmp_path / "hostile")
    cfg = meshfile.load(owner.home)
    assert cfg is not None and cfg.owners == (public_key_bytes(node_key(owner)),)

    def header(statement: rotation.Rotation, secret: bytes = b"h" * 32) -> dict[str, Any]:
        return {"t": "rotate", "chain": [rotation.to_hex(statement)], "secret": secret.hex()}

    mine = hostile.key
    stolen = node_key(owner)  # even the owner's own key cannot make a jump acceptable
    forged = [
        {"t": "rotate", "chain": ["00" * 40], "secret": "11" * 32},  # unsigned garbage
        {"t": "rotate", "epoch": 4294967295, "secret": "11" * 32},  # the old wire form
        header(_forge(cfg, mine, 2, b"h" * 32)),  # signed by a non-owner
        header(_forge(cfg, mine, 4294967295, b"h" * 32)),
        header(_forge(cfg, stolen, 3, b"h" * 32)),  # epoch + 2
        header(_forge(cfg, stolen, 2, b"h" * 32), secret=b"z" * 32),  # the secret does not match
        {"t": "rotate", "chain": [rotation.to_hex(_forge(cfg, mine, 2, b"h" * 32))] * 9, "secret": "11" * 32},
    ]
    # and eviction notices that would make the owner believe it was removed (it would stop dialling the mesh)
    owner_id = owner.status()["node_id"]
    evict_owner = rotation.sign(mine, cfg.mesh_id, 2, b"h" * 32, (public_key_bytes(mine),), (owner_id,))
    forged += [
        {"t": "evicted", "chain": [rotation.to_hex(evict_owner)]},  # signed by a non-owner
        # an owner's statement, but one that evicts nobody
        {"t": "evicted", "chain": [rotation.to_hex(_forge(cfg, stolen, 2, b"h" * 32))]},
        {"t": "evicted", "chain": "nope"},
    ]
    replies = anyio.run(_send_rotations, hostile, token, forged)
    assert all(r.get("t") != "rotated" for r in replies), replies
    owner.wait_log(f"refused an eviction notice from node {hostile.node_id}: .*not an owner", timeout=30)
    owner.wait_log(f"refused an eviction notice from node {hostile.node_id}: the statements do not evict", timeout=30)
    assert "was removed from mesh" not in owner.log()
    for why in ("not an owner", "jump", "does not match", "too long", "missing"):
        owner.wait_log(f"refused a key rotation from node {hostile.node_id}: .*{why}", timeout=30)
    assert (owner.home / "mesh.toml").read_bytes() == saved
    assert epoch_of(owner) == 1 and owner.proc is not None and owner.proc.poll() is None
    for epoch in (2, 3):
        out = mesh_llm("rotate-key", "--console-port", str(owner.console_port))
        assert out.returncode == 0, out.stderr
        assert tokens.decode(out.stdout.strip()).epoch == epoch == epoch_of(owner)
    # a replay of the (real, owner-signed) rotation to epoch 2, by a member holding the current secret
    now = meshfile.load(owner.home)
    assert now is not None and [r.epoch for r in now.rotations] == [2, 3]
    saved = (owner.home / "mesh.toml").read_bytes()
    replay = header(now.rotations[0], secret=now.previous_secrets[0])
    (reply,) = anyio.run(_send_rotations, hostile, token, [replay], now.secret)
    assert reply["t"] == "rotate-refused" and "replay" in reply["reason"]
    owner.wait_log(f"refused a key rotation from node {hostile.node_id}: a replay", timeout=30)
    assert (owner.home / "mesh.toml").read_bytes() == saved
    out = mesh_llm("rotate-key", "--console-port", str(owner.console_port))
    assert out.returncode == 0 and tokens.decode(out.stdout.strip()).epoch == 4, out.stderr
    # a member that is not an owner is told so, in words
    member = start(spawn, "member", "127.0.0.3", "--join", out.stdout.strip())
    token_of(member)
    refused = mesh_llm("rotate-key", "--console-port", str(member.console_port))
    assert refused.returncode == 1 and "not an owner" in refused.stderr and owner.status()["node_id"] in refused.stderr


@pytest.mark.slow
def test_rotate_key_evict_removes_a_member_and_a_client(llama: object, spawn: Spawn, tmp_path: Path) -> None:
    owner = start(spawn, "owner", "127.0.0.2")
    old = token_of(owner)
    keep = start(spawn, "keep", "127.0.0.3", "--join", old)
    evictee = spawn("--mesh-host", "127.0.0.4", "--join", old, name="evictee")  # a member (not a client)
    client = start(spawn, "client", "127.0.0.5", "--join", old)
    ids = {
        id(n): n.wait_for("joined", lambda s: bool(s.get("invite_token")), 120)["node_id"]
        for n in (keep, evictee, client)
    }
    owner.wait_for("the member", lambda s: ids[id(evictee)] in {p["node_id"] for p in s["peers"]}, 60)
    out = mesh_llm(
        "rotate-key", "--evict", ids[id(evictee)], "--evict", ids[id(client)], "--console-port", str(owner.console_port)
    )
    assert out.returncode == 0, out.stderr
    new = out.stdout.strip()
    # the evicted are told, in a sentence, and never get the new secret
    for gone in (evictee, client):
        gone.wait_log("this node was removed from mesh .* by its owner", timeout=20)
        assert epoch_of(gone) == 1
    # the others get epoch 2 and the evicted member vanishes from every member's view
    keep.wait_for("epoch 2", lambda s: tokens.decode(s["invite_token"]).epoch == 2, 20)
    for node in (owner, keep):
        node.wait_for("evictee gone", lambda s: ids[id(evictee)] not in {p["node_id"] for p in s["peers"]}, 20)
    saved = meshfile.load(keep.home)
    assert saved is not None and saved.epoch == 2 and {ids[id(evictee)], ids[id(client)]} <= set(saved.evicted)
    # re-dialling with the old secret (or even the new one) is refused as removed
    for gone in (evictee, client):
        identity = load_or_create(gone.home)
        for secret in (tokens.decode(old).secret, tokens.decode(new).secret):
            with pytest.raises(HandshakeRefused) as info:
                anyio.run(_send_rotations, identity, tokens.decode(old), [], secret)
            assert info.value.code == "evicted"
    # the kept member still works through the mesh with the new token
    late = start(spawn, "late", "127.0.0.6", "--join", new)
    late.wait_for("joined", lambda s: bool(s.get("invite_token")), 30)
    assert keep.proc is not None and keep.proc.poll() is None

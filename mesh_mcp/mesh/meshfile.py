"""This node's mesh membership -- which mesh it belongs to and the secret that proves it --
kept as ``mesh.toml`` in the node's home directory.

The file is a credential: anyone holding it can join the mesh. `save` writes it atomically
(a private temporary file in the same directory, fsync, rename), so a crash leaves the old file
or the new one, never half of one, and always with mode 0600. When `load` finds the file open to
group or others it tightens the mode to 0600 and logs a warning rather than refusing to start
(as `mesh_mcp.mesh.identity` does for the node key); a file it cannot read, or cannot make private
because another user owns it, is a `ConfigError`.

`create`, `rotate`, `owner_rotate`, `advance`, `from_token` and `to_token` are pure; randomness is injected.

Who may rotate: the mesh's owners (Ed25519 public keys of nodes; the creating node's key when this node
created the mesh, else the owners its invite token named or, for an old token, the first member it met told
it). A rotation is an owner-signed statement (`rotation.py`); the last `MAX_CHAIN` are kept so they can be
relayed to members that missed them, and the node ids they evicted are remembered (`MAX_EVICTED`) so those
nodes stay refused whatever secret they still hold.

File layout (bytes as lowercase hex, `previous_secrets` newest first, `rotations` oldest first; the last
three keys are optional, so files from before owners existed still load, with no owners known)::

    version = 1
    mesh_id = "<32 hex>"
    epoch = 3
    secret = "<64 hex>"
    previous_secrets = ["<64 hex>", ...]
    owners = ["<64 hex>", ...]
    evicted = ["<16 hex node id>", ...]
    rotations = ["<hex statement>", ...]
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh_mcp.errors import ConfigError, RotationRefused
from mesh_mcp.mesh.identity import node_id_for

from . import rotation as rot
from .records import public_key_bytes
from .rotation import MAX_CHAIN, MAX_OWNERS, Rotation
from .tokens import MAX_EPOCH, MESH_ID_BYTES, PROTOCOL_VERSION, SECRET_BYTES, InviteToken

__all__ = [
    "FILE_VERSION",
    "MAX_EVICTED",
    "MAX_PREVIOUS_SECRETS",
    "MESH_FILE",
    "MeshConfig",
    "advance",
    "create",
    "from_token",
    "learn_owners",
    "load",
    "owner_rotate",
    "path_for",
    "rotate",
    "save",
    "to_token",
]

log = logging.getLogger("mesh_llm.meshfile")

MESH_FILE = "mesh.toml"
FILE_VERSION = 1
MAX_PREVIOUS_SECRETS = 3
"""How many superseded secrets `rotate` keeps, so members that have not yet heard of a rotation still get in."""
MAX_EVICTED = 256
"""Evicted node ids remembered (oldest forgotten first). An evicted node never gets a newer secret, and
its old ones stop being accepted `MAX_PREVIOUS_SECRETS` rotations later, so only the recent ones matter."""

RandomBytes = Callable[[int], bytes]

_HEADER = (
    "# mesh-llm: this node's mesh membership. Keep it private (mode 0600):\n"
    "# anyone holding this file can join the mesh. Written by mesh-llm; do not edit.\n\n"
)
_KEYS = frozenset({"version", "mesh_id", "epoch", "secret", "previous_secrets"})
_OPTIONAL = frozenset({"owners", "evicted", "rotations"})


@dataclass(frozen=True)
class MeshConfig:
    """The mesh this node belongs to and its secret; `previous_secrets` (newest first) are still accepted
    from existing members after a `rotate`, while new joins need `secret`."""

    mesh_id: bytes
    secret: bytes = field(repr=False)
    epoch: int
    previous_secrets: tuple[bytes, ...] = field(default=(), repr=False)
    owners: tuple[bytes, ...] = ()  # Ed25519 public keys that may sign a rotation; () = not known yet
    evicted: tuple[str, ...] = ()  # node ids removed by a rotation, oldest first: refused whatever they prove
    rotations: tuple[Rotation, ...] = ()  # the last signed statements, oldest first (relayed to late members)

    def __post_init__(self) -> None:
        if not isinstance(self.mesh_id, bytes) or len(self.mesh_id) != MESH_ID_BYTES:
            raise ConfigError(f"a mesh id is {MESH_ID_BYTES} bytes")
        if not isinstance(self.secret, bytes) or len(self.secret) != SECRET_BYTES:
            raise ConfigError(f"a mesh secret is {SECRET_BYTES} bytes")
        if type(self.epoch) is not int or not 1 <= self.epoch <= MAX_EPOCH:
            raise ConfigError(f"the secret epoch must be an integer in 1..{MAX_EPOCH}, not {self.epoch!r}")
        if not isinstance(self.previous_secrets, tuple) or len(self.previous_secrets) > MAX_PREVIOUS_SECRETS:
            raise ConfigError(f"previous_secrets must be a tuple of at most {MAX_PREVIOUS_SECRETS} secrets")
        for old in self.previous_secrets:
            if not isinstance(old, bytes) or len(old) != SECRET_BYTES:
                raise ConfigError(f"a mesh secret is {SECRET_BYTES} bytes")
        if not isinstance(self.owners, tuple) or len(self.owners) > MAX_OWNERS:
            raise ConfigError(f"a mesh has at most {MAX_OWNERS} owners")
        if any(not isinstance(o, bytes) or len(o) != 32 for o in self.owners):
            raise ConfigError("an owner is a 32-byte Ed25519 public key")
        if not isinstance(self.evicted, tuple) or len(self.evicted) > MAX_EVICTED:
            raise ConfigError(f"at most {MAX_EVICTED} evicted nodes are remembered")
        if any(not isinstance(n, str) or len(n) != 16 or n.strip("0123456789abcdef") for n in self.evicted):
            raise ConfigError("an evicted node id is 16 hex characters")
        if not isinstance(self.rotations, tuple) or len(self.rotations) > MAX_CHAIN:
            raise ConfigError(f"at most {MAX_CHAIN} rotations are kept")

    @property
    def mesh_id_hex(self) -> str:
        """The mesh id as 32 hex characters: safe to log (the secrets never are)."""
        return self.mesh_id.hex()

    @property
    def accepted_secrets(self) -> tuple[bytes, ...]:
        """Secrets an existing member may prove: the current one first, then the previous ones."""
        return (self.secret, *self.previous_secrets)

    @property
    def owner_ids(self) -> tuple[str, ...]:
        """The owners' node ids (safe to show)."""
        return tuple(node_id_for(o) for o in self.owners)

    def chain_since(self, epoch: int) -> tuple[Rotation, ...] | None:
        """The statements that take a member at `epoch` to this one, or None if they are no longer kept."""
        needed = tuple(r for r in self.rotations if r.epoch > epoch)
        if len(needed) != self.epoch - epoch:
            return None
        return needed


# --- pure -------------------------------------------------------------------------------------


def create(rng_bytes: RandomBytes = os.urandom, owner: bytes | None = None) -> MeshConfig:
    """A brand-new mesh: random id and secret, epoch 1, owned by `owner` (the creating node's public key)."""
    return MeshConfig(
        mesh_id=rng_bytes(MESH_ID_BYTES),
        secret=rng_bytes(SECRET_BYTES),
        epoch=1,
        owners=(owner,) if owner is not None else (),
    )


def rotate(cfg: MeshConfig, rng_bytes: RandomBytes = os.urandom) -> MeshConfig:
    """A new secret at the next epoch; the old one moves to the front of `previous_secrets`
    (the oldest falls off beyond `MAX_PREVIOUS_SECRETS`). Invite tokens made before are void."""
    if cfg.epoch >= MAX_EPOCH:
        raise ConfigError(f"the mesh secret has been rotated {MAX_EPOCH} times; create a new mesh")
    previous = (cfg.secret, *cfg.previous_secrets)[:MAX_PREVIOUS_SECRETS]
    return replace(cfg, secret=rng_bytes(SECRET_BYTES), epoch=cfg.epoch + 1, previous_secrets=previous)


def owner_rotate(
    cfg: MeshConfig,
    key: Ed25519PrivateKey,
    *,
    evict: tuple[str, ...] = (),
    add_owners: tuple[bytes, ...] = (),
    rng_bytes: RandomBytes = os.urandom,
) -> tuple[MeshConfig, Rotation]:
    """A rotation by this node (an owner): a new secret at the next epoch, signed; the owners after it are
    the current ones plus `add_owners`, less evicted ones. ConfigError in words when this node may not."""
    me = public_key_bytes(key)
    if me not in cfg.owners:
        named = ", ".join(cfg.owner_ids) or "not known to this node yet"
        raise ConfigError(
            f"this node is not an owner of mesh {cfg.mesh_id_hex[:8]}, so it cannot rotate the mesh key: run "
            f"`mesh-llm rotate-key` on an owner (the node that created the mesh, or one it named with --add-owner; "
            f"owners: {named})"
        )
    evict = tuple(dict.fromkeys(evict))
    if node_id_for(me) in evict:
        raise ConfigError("a node cannot evict itself; run `mesh-llm rotate-key --evict` on another owner")
    owners = tuple(o for o in dict.fromkeys((*cfg.owners, *add_owners)) if node_id_for(o) not in evict)
    if len(owners) > MAX_OWNERS:
        raise ConfigError(f"a mesh has at most {MAX_OWNERS} owners")
    if len(evict) > rot.MAX_EVICT:
        raise ConfigError(f"one rotation evicts at most {rot.MAX_EVICT} nodes; rotate again for the rest")
    nxt = rotate(cfg, rng_bytes)
    statement = rot.sign(key, cfg.mesh_id, nxt.epoch, nxt.secret, owners, evict)
    return _after(nxt, (statement,)), statement


def advance(cfg: MeshConfig, chain: tuple[Rotation, ...], secret: bytes) -> MeshConfig:
    """`cfg` after a chain of statements from a peer (verified here: `rotation.check_chain`) and the secret
    of its last epoch (checked against the signed hash). RotationRefused if anything does not hold."""
    chain = tuple(r for r in chain if r.epoch > cfg.epoch) or chain[-1:]  # what a member has seen is skipped
    owners, _ = rot.check_chain(chain, mesh_id=cfg.mesh_id, epoch=cfg.epoch, owners=cfg.owners)
    if len(secret) != SECRET_BYTES or rot.secret_hash(secret) != chain[-1].secret_sha256:
        raise RotationRefused(f"the secret sent does not match the signed hash for epoch {chain[-1].epoch}")
    previous = (cfg.secret, *cfg.previous_secrets)[:MAX_PREVIOUS_SECRETS]
    moved = replace(cfg, secret=secret, epoch=chain[-1].epoch, previous_secrets=previous, owners=owners)
    return _after(moved, chain)


def _after(cfg: MeshConfig, chain: tuple[Rotation, ...]) -> MeshConfig:
    """Record `chain` (already applied to the secret and epoch): owners, evictions, kept statements."""
    evicted = tuple(dict.fromkeys((*cfg.evicted, *(n for r in chain for n in r.evicted))))[-MAX_EVICTED:]
    return replace(cfg, owners=chain[-1].owners, evicted=evicted, rotations=(*cfg.rotations, *chain)[-MAX_CHAIN:])


def learn_owners(cfg: MeshConfig, owners: tuple[bytes, ...]) -> MeshConfig:
    """Owners told by the first member met, for a node whose token did not name them (trust on first use)."""
    if cfg.owners or not owners:
        return cfg
    return replace(cfg, owners=owners)


def from_token(token: InviteToken) -> MeshConfig:
    """The membership a node joining through `token` starts with."""
    return MeshConfig(mesh_id=token.mesh_id, secret=token.secret, epoch=token.epoch, owners=token.owners)


def to_token(cfg: MeshConfig, addresses: tuple[str, ...]) -> InviteToken:
    """An invite to this mesh, dialling `addresses` ("host:port" of this node's QUIC listener)."""
    return InviteToken(
        mesh_id=cfg.mesh_id,
        secret=cfg.secret,
        addresses=addresses,
        protocol=PROTOCOL_VERSION,
        epoch=cfg.epoch,
        owners=cfg.owners,
    )


# --- the file ---------------------------------------------------------------------------------


def path_for(home: Path) -> Path:
    return home / MESH_FILE


def for_node(home: Path, tokens: tuple[InviteToken, ...], owner: bytes) -> MeshConfig:
    """The mesh a starting node belongs to: the one a token names, else the one it created before, else a new one
    owned by `owner` (the node's public key). A token's mesh is not saved here: the mesh saves it once the join
    succeeded, so a refused join leaves mesh.toml as it was."""
    existing = load(home)
    if tokens:
        joined = from_token(tokens[0])
        if existing is not None and existing.mesh_id == joined.mesh_id and existing.epoch >= joined.epoch:
            return existing
        return joined
    if existing is None:
        existing = create(owner=owner)
        save(home, existing)
        log.info("created mesh %s", existing.mesh_id_hex[:8])
    return existing


def load(home: Path) -> MeshConfig | None:
    """The saved membership, or None if this node has not joined or created a mesh yet."""
    path = path_for(home)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}; check its owner and permissions") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file; move it away")
        if st.st_mode & 0o077:
            try:
                os.fchmod(fd, 0o600)
            except OSError as exc:
                raise ConfigError(
                    f"{path} is readable by other users and cannot be made private ({exc.strerror}); "
                    f"run: chmod 600 {path}"
                ) from exc
            log.warning("%s was open to other users (mode %o); set it to 0600", path, stat.S_IMODE(st.st_mode))
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _corrupt(path, str(exc)) from exc
    return _from_document(doc, path)


def save(home: Path, cfg: MeshConfig) -> None:
    """Write `cfg` to ``home/mesh.toml`` atomically, mode 0600 (creating `home` if needed)."""
    path = path_for(home)
    text = _HEADER + tomli_w.dumps(_to_document(cfg))
    try:
        home.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{MESH_FILE}.", suffix=".tmp", dir=home)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
        raise
    _fsync_dir(home)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; best effort (not every platform can open a directory)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _to_document(cfg: MeshConfig) -> dict[str, Any]:
    return {
        "version": FILE_VERSION,
        "mesh_id": cfg.mesh_id.hex(),
        "epoch": cfg.epoch,
        "secret": cfg.secret.hex(),
        "previous_secrets": [s.hex() for s in cfg.previous_secrets],
        "owners": [o.hex() for o in cfg.owners],
        "evicted": list(cfg.evicted),
        "rotations": [rot.to_hex(r) for r in cfg.rotations],
    }


def _corrupt(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"{path} is corrupt ({why}); restore it, or move it away and join the mesh again with an invite token"
    )


def _from_document(doc: dict[str, Any], path: Path) -> MeshConfig:
    version = doc.get("version")
    if type(version) is int and version > FILE_VERSION:
        raise ConfigError(f"{path} was written by a newer mesh-llm (format {version}); upgrade mesh-llm")
    if version != FILE_VERSION or type(version) is not int:
        raise _corrupt(path, f"version must be {FILE_VERSION}, not {version!r}")
    unknown = sorted(set(doc) - _KEYS - _OPTIONAL)
    if unknown:
        raise _corrupt(path, f"unknown keys: {', '.join(unknown)}")
    missing = sorted(_KEYS - set(doc))
    if missing:
        raise _corrupt(path, f"missing keys: {', '.join(missing)}")
    for key in ("previous_secrets", *_OPTIONAL):
        if not isinstance(doc.get(key, []), list):
            raise _corrupt(path, f"{key} must be a list")
    try:
        return MeshConfig(
            mesh_id=_hex(doc["mesh_id"], "mesh_id"),
            secret=_hex(doc["secret"], "secret"),
            epoch=doc["epoch"],
            previous_secrets=tuple(_hex(s, "previous_secrets") for s in doc["previous_secrets"]),
            owners=tuple(_hex(o, "owners") for o in doc.get("owners", [])),
            evicted=tuple(doc.get("evicted", [])),
            rotations=tuple(rot.from_hex(r) for r in doc.get("rotations", [])),
        )
    except (ConfigError, RotationRefused) as exc:
        raise _corrupt(path, str(exc)) from exc


def _hex(value: object, key: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise ConfigError(f"{key} is not valid hex") from exc

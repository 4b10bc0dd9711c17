"""mesh.toml: pure membership changes (create, rotate, tokens) and the private, atomic file."""

from __future__ import annotations

import logging
import os
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from mesh_mcp.errors import ConfigError
from mesh_mcp.mesh import meshfile
from mesh_mcp.mesh.meshfile import MAX_PREVIOUS_SECRETS, MESH_FILE, MeshConfig, create, from_token, load, rotate, save
from mesh_mcp.mesh.tokens import decode, encode


def counter_rng() -> Callable[[int], bytes]:
    """Deterministic 'random' bytes: 1, 2, 3, ... repeated to the requested length."""
    n = 0

    def rng(size: int) -> bytes:
        nonlocal n
        n += 1
        return bytes([n]) * size

    return rng


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- pure -------------------------------------------------------------------------------------


def test_create() -> None:
    cfg = create(counter_rng())
    assert cfg == MeshConfig(mesh_id=b"\x01" * 16, secret=b"\x02" * 32, epoch=1, previous_secrets=())
    assert cfg.mesh_id_hex == "01" * 16
    assert cfg.accepted_secrets == (b"\x02" * 32,)


def test_create_uses_os_urandom_by_default() -> None:
    a, b = create(), create()
    assert a.mesh_id != b.mesh_id and a.secret != b.secret


def test_rotate_keeps_mesh_and_moves_old_secret_back() -> None:
    rng = counter_rng()
    cfg = create(rng)
    r1 = rotate(cfg, rng)
    assert r1.mesh_id == cfg.mesh_id
    assert r1.epoch == 2
    assert r1.secret == b"\x03" * 32
    assert r1.previous_secrets == (cfg.secret,)
    assert r1.accepted_secrets == (r1.secret, cfg.secret)


def test_rotate_keeps_at_most_a_few_previous_secrets_newest_first() -> None:
    rng = counter_rng()
    cfg = create(rng)
    history = [cfg.secret]
    for _ in range(MAX_PREVIOUS_SECRETS + 3):
        cfg = rotate(cfg, rng)
        history.insert(0, cfg.secret)
    assert cfg.epoch == MAX_PREVIOUS_SECRETS + 4
    assert cfg.previous_secrets == tuple(history[1 : 1 + MAX_PREVIOUS_SECRETS])
    assert len(cfg.previous_secrets) == MAX_PREVIOUS_SECRETS


def test_token_round_trip() -> None:
    cfg = rotate(rotate(create(counter_rng())))
    token = meshfile.to_token(cfg, ("[::1]:7000", "node.lan:7000"))
    joined = from_token(decode(encode(token)))
    assert joined.mesh_id == cfg.mesh_id
    assert joined.secret == cfg.secret
    assert joined.epoch == cfg.epoch == 3
    assert joined.previous_secrets == ()


def test_secrets_stay_out_of_repr() -> None:
    cfg = rotate(create(counter_rng()))
    text = repr(cfg)
    for secret in cfg.accepted_secrets:
        assert secret.hex() not in text and repr(secret) not in text
    assert "epoch=2" in text


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"mesh_id": b"x"}, "16 bytes"),
        ({"secret": b"x" * 33}, "32 bytes"),
        ({"epoch": 0}, "epoch"),
        ({"epoch": True}, "epoch"),
        ({"previous_secrets": (b"x",)}, "32 bytes"),
        ({"previous_secrets": (b"x" * 32,) * (MAX_PREVIOUS_SECRETS + 1)}, "at most"),
    ],
)
def test_construction_is_validated(kwargs: dict[str, object], why: str) -> None:
    fields: dict[str, object] = {"mesh_id": b"\x01" * 16, "secret": b"\x02" * 32, "epoch": 1, **kwargs}
    with pytest.raises(ConfigError, match=why):
        MeshConfig(**fields)  # type: ignore[arg-type]


# --- the file ---------------------------------------------------------------------------------


def test_load_without_file_is_none(tmp_path: Path) -> None:
    assert load(tmp_path) is None
    assert load(tmp_path / "not-created-yet") is None


def test_save_load_round_trip(tmp_path: Path) -> None:
    home = tmp_path / "home"  # created by save
    cfg = rotate(rotate(create(counter_rng())))
    save(home, cfg)
    assert load(home) == cfg
    text = (home / MESH_FILE).read_text()
    assert text.startswith("# mesh-llm")
    assert tomllib.loads(text)["epoch"] == 3


def test_saved_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        save(tmp_path, create(counter_rng()))
    finally:
        os.umask(old)
    assert mode(tmp_path / MESH_FILE) == 0o600


def test_save_replaces_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    rng = counter_rng()
    cfg = create(rng)
    save(tmp_path, cfg)
    cfg2 = rotate(cfg, rng)
    save(tmp_path, cfg2)
    assert load(tmp_path) == cfg2
    assert sorted(p.name for p in tmp_path.iterdir()) == [MESH_FILE]


def test_failed_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Atomicity: a write that fails before the rename leaves the old file whole and no debris."""
    rng = counter_rng()
    cfg = create(rng)
    save(tmp_path, cfg)

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(ConfigError, match=r"cannot write .*No space left"):
        save(tmp_path, rotate(cfg, rng))
    monkeypatch.undo()
    assert load(tmp_path) == cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == [MESH_FILE]


def test_too_open_file_is_made_private(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = create(counter_rng())
    save(tmp_path, cfg)
    path = tmp_path / MESH_FILE
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="mesh_llm.meshfile"):
        assert load(tmp_path) == cfg
    assert mode(path) == 0o600
    assert "set it to 0600" in caplog.text
    assert cfg.secret.hex() not in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    save(tmp_path, create(counter_rng()))
    path = tmp_path / MESH_FILE
    path.chmod(0o000)
    try:
        with pytest.raises(ConfigError, match=r"cannot read .*Permission denied"):
            load(tmp_path)
    finally:
        path.chmod(0o600)


def test_directory_in_the_way(tmp_path: Path) -> None:
    (tmp_path / MESH_FILE).mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        load(tmp_path)


VALID = {
    "version": "1",
    "mesh_id": '"' + "01" * 16 + '"',
    "epoch": "2",
    "secret": '"' + "02" * 32 + '"',
    "previous_secrets": '["' + "03" * 32 + '"]',
}


def document(**changes: str | None) -> str:
    fields = {**VALID, **changes}
    return "".join(f"{k} = {v}\n" for k, v in fields.items() if v is not None)


def test_hand_written_valid_document_loads(tmp_path: Path) -> None:
    path = tmp_path / MESH_FILE
    path.write_text(document())
    path.chmod(0o600)
    cfg = load(tmp_path)
    assert cfg == MeshConfig(mesh_id=b"\x01" * 16, secret=b"\x02" * 32, epoch=2, previous_secrets=(b"\x03" * 32,))


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x00\xff\xfe garbage", "corrupt"),
        (b"mesh_id = ", "corrupt"),
        (b"", "corrupt.*version"),
        (document(version='"1"').encode(), "corrupt.*version"),
        (document(mesh_id='"zz"').encode(), "corrupt.*mesh_id is not valid hex"),
        (document(mesh_id="12").encode(), "corrupt.*mesh_id must be a hex string"),
        (document(mesh_id='"0102"').encode(), "corrupt.*16 bytes"),
        (document(secret='"' + "02" * 31 + '"').encode(), "corrupt.*32 bytes"),
        (document(secret=None).encode(), "corrupt.*missing keys: secret"),
        (document(epoch="0").encode(), "corrupt.*epoch"),
        (document(epoch='"2"').encode(), "corrupt.*epoch"),
        (document(previous_secrets='"x"').encode(), "corrupt.*previous_secrets must be a list"),
        (document(previous_secrets='["zz"]').encode(), "corrupt.*previous_secrets is not valid hex"),
        ((document() + "name = 'x'\n").encode(), "corrupt.*unknown keys: name"),
        (document(version="2").encode(), "newer mesh-llm.*upgrade"),
    ],
)
def test_corrupt_file(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / MESH_FILE
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=why) as info:
        load(tmp_path)
    if "corrupt" in why:
        assert "move it away and join the mesh again" in str(info.value)


def test_permission_denied_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same as test_unreadable_file, but also where the tests run as root."""
    save(tmp_path, create(counter_rng()))

    def denied(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ConfigError, match=r"cannot read .*Permission denied; check its owner"):
        load(tmp_path)


def test_open_file_of_another_user_cannot_be_fixed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path, create(counter_rng()))
    (tmp_path / MESH_FILE).chmod(0o644)

    def not_owner(fd: int, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", not_owner)
    with pytest.raises(ConfigError, match=r"readable by other users .*run: chmod 600"):
        load(tmp_path)

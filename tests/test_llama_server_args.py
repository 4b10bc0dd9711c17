"""The llama-server command line: every surprising default is set explicitly, loopback only."""

from __future__ import annotations

from pathlib import Path

from inference.exits import describe_exit
from inference.llama_server import ServerSettings, server_args
from inference.supervise import MAX_TAIL_LINE, printable, tail


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_server_args_are_explicit_and_loopback_only() -> None:
    args = server_args(
        Path("/bin/llama-server"), Path("/m/x.gguf"), "x", 4242, ServerSettings(ctx_per_slot=2048, slots=3)
    )
    assert args[0] == "/bin/llama-server"
    assert flag(args, "--host") == "127.0.0.1"
    assert flag(args, "--port") == "4242"
    assert flag(args, "--ctx-size") == str(2048 * 3)
    assert flag(args, "--parallel") == "3"
    assert flag(args, "--fit") == "off"
    assert flag(args, "--alias") == "x"
    assert flag(args, "--n-gpu-layers") == "0"
    assert "--embeddings" not in args


def test_embeddings_and_extra_args() -> None:
    s = ServerSettings(embeddings=True, gpu_layers=999, extra_args=("--temp", "0"))
    args = server_args(Path("ls"), Path("m.gguf"), "m", 1, s)
    assert "--embeddings" in args and flag(args, "--n-gpu-layers") == "999"
    assert args[-2:] == ["--temp", "0"]


def test_exit_codes_are_explained() -> None:
    assert "could not load" in describe_exit(1).text
    assert "aborted" in describe_exit(134).text
    assert "signal 9" in describe_exit(-9).text and "SIGKILL" in describe_exit(-9).text


def test_log_tails_are_bounded_and_printable(tmp_path: Path) -> None:
    """A request can put bytes into llama-server's log; its tail reaches terminals, the console and the API."""
    log = tmp_path / "llama-server.log"
    log.write_bytes(b"x" * 100_000 + b"\nok line\tTAB\n\x1b]0;pwned\x07\x1b[2J" + "\u202eevil\n".encode() + b"y" * 5000)
    out = tail(log)
    assert "ok line\tTAB" in out and "evil" in out
    assert not any(c in out for c in ("\x1b", "\x07", "\u202e"))
    assert all(len(line) <= MAX_TAIL_LINE for line in out.splitlines())
    assert printable("a\nb\tc") == "a\nb\tc"

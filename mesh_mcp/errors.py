"""The project's one error tree.

Foreign errors (HTTP clients, subprocesses, file formats) are translated into these at the adapter
that met them (`raise ... from exc`). Every message says what happened and what to do about it.
"""

from __future__ import annotations


class MeshLLMError(Exception):
    """Root of every error mesh-llm raises on purpose."""


class ConfigError(MeshLLMError):
    """The user's arguments or environment are wrong (bad flag, bad path)."""


class BuildError(MeshLLMError):
    """llama.cpp could not be obtained or built."""


class ToolchainMissing(BuildError):
    """A compiler or cmake is missing; the message says what to install."""


class ModelError(MeshLLMError):
    """A model could not be resolved, fetched or read."""


class ModelNotFound(ModelError):
    """A --model spec matches nothing (the message lists close matches)."""


class DownloadError(ModelError):
    """A download failed: HTTP error, unreachable host, wrong size or hash, not a GGUF."""


class DiskFull(DownloadError):
    """No room for a model file, wheel, shard or cache entry: free space was checked before a write of known size,
    or the disk filled up (ENOSPC) or hit its quota (EDQUOT) while writing. The message has the numbers and what
    to free; the operation failed, the node goes on."""


class CorruptModel(ModelError):
    """A file on disk is not a valid GGUF."""


class DraftRefused(ModelError):
    """A draft model cannot speculate for its target (another tokenizer): the target serves without it."""


class BackendError(MeshLLMError):
    """A llama.cpp process failed to start, crashed, or answered wrongly."""


class BackendLoading(BackendError):
    """The backend is up but still loading its model (the API answers 503 + Retry-After)."""


class UpstreamUnavailable(BackendError):
    """The upstream could not be reached, or failed before sending a response head."""


class UpstreamBroken(BackendError):
    """The upstream failed after the response started (truncated body)."""


class PeerUnreachable(MeshLLMError, OSError):
    """A node of the mesh could not be reached: not known, no address answered in time, refused, or its connection
    failed while opening a stream (`Mesh.reach` / `Mesh.dial`). Also an `OSError`, as network failures are."""


class ProtocolError(MeshLLMError):
    """A peer sent something malformed, unsigned, oversized or of the wrong version.

    The stream (or connection) that carried it is closed and the event logged; the node goes on."""


class AuthError(ProtocolError):
    """A peer could not prove it holds the mesh secret, or its identity does not match its key."""


class HandshakeRefused(AuthError):
    """A mesh handshake failed for a reason the refusing side names: `code` is one of
    `handshake.REFUSAL_CODES` (``old-token``, ``other-mesh``, ``bad-secret``, ``evicted``, ``protocol``);
    `epoch` is the mesh's current secret epoch for ``old-token``. The message is a sentence for the user."""

    def __init__(self, message: str, code: str, epoch: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.epoch = epoch


class RotationRefused(ProtocolError):
    """A key rotation statement was refused: not signed by a current owner, a replay, an epoch jump,
    another mesh's, or a secret that does not match its hash. Logged with the sending node; nothing changes."""


class JoinRefused(ConfigError):
    """Every mesh node this node tried refused it (old or foreign token, wrong secret, removed from the mesh):
    the node stops, saying why and what to do."""


class InvalidToken(ConfigError):
    """An invite token is malformed, mistyped (checksum) or of an unsupported version."""


class BlackboardError(MeshLLMError):
    """A post the blackboard refuses (too long, empty, rate-limited, store full); the poster sees it."""


class RateLimited(BlackboardError):
    """An author posted faster than the blackboard allows; `retry_after` seconds until the next post fits."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PostTooLarge(BlackboardError):
    """A post's text is over the size limit."""


class BlackboardDiskFull(BlackboardError):
    """The disk holding the blackboard database is full: the post was not stored, the posts already stored are
    kept (the console answers 507)."""


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups — what a task group's failure was about."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def user_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The MeshLLMError a task group wrapped, when that is all it holds (its message is for the user); else None."""
    matched, rest = group.split(MeshLLMError)
    if rest is not None or matched is None:
        return None
    return first_leaf(matched)

"""The one definition of the characters that text from a user or a peer must not carry into a terminal, a log line
or a stored post — controls, bidi overrides and invisible format characters — and the two ways to be rid of them.

Hidden: the C0 controls except tab and newline (ESC starts terminal escapes, CR overwrites a line, BEL rings), DEL,
the C1 controls (U+0080–U+009F; U+009B is a one-byte CSI to many terminals), and every Unicode format character
(category Cf): the bidi marks, embeddings, overrides and isolates (U+200E/F, U+202A–E, U+2066–9, U+061C) that
reorder what a reader sees, zero-width spaces, the word joiner, the byte-order mark, soft hyphens and the tag
characters (U+E0000–U+E007F, invisible ASCII that a model reads but a person does not). Kept: the zero-width
non-joiner and joiner (U+200C, U+200D), which Persian and Indic scripts and emoji sequences need and which hide
nothing.

`strip_controls` removes them (what is stored); `printable` shows each as U+FFFD (what is displayed, so a reader
sees that something was there). Pure, standard library only, so every package can import it. The format characters
are written out as one regular expression (64 KiB of non-ASCII text is cleaned in about 1 ms; asking `unicodedata`
per character took ~10 ms); tests/security/test_blackboard_abuse.py checks it against `unicodedata`'s
Cf category, so a newer Unicode version that adds one is noticed.
"""

from __future__ import annotations

import re

# C0 but tab and newline; DEL and C1; then Unicode 15's Cf (format) characters but U+200C/U+200D.
_HIDDEN = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b\u200e\u200f"
    "\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)
REPLACEMENT = "\ufffd"


def is_hidden(char: str) -> bool:
    """True for a control, bidi or invisible format character (tab and newline are not hidden)."""
    return _HIDDEN.fullmatch(char) is not None


def _replace(text: str, by: str) -> str:
    return _HIDDEN.sub(by, text)


def strip_controls(text: str) -> str:
    """`text` without control, bidi and invisible format characters (newlines and tabs kept)."""
    return _replace(text, "")


def printable(text: str) -> str:
    """`text` with control, bidi and invisible format characters shown as U+FFFD (newlines and tabs kept)."""
    return _replace(text, REPLACEMENT)

"""A node's published demand view on the wire: the one strict parser of a record's `demand` field, and its limits.

The mesh plane owns the wire form (records carry it, and mesh/ imports nothing of serving/); the serving plane's
demand map (`serving/demand.py`) converts it to and from its `DemandMap`. The form is a list of
`[name, rate in milli-req/min, as_of s, last_wanted s, pinned]` sorted by name: integers only, so a signed record has
one canonical encoding and no NaN or float formatting can reach it. A pin with no entry is `[name, 0, 0, 0, true]`; an
unpinned all-zero entry says nothing and is refused. Parsed, a view is a tuple of `Item`s (plain tuples, immutable,
hashable: a record field) in the same order.
"""

from __future__ import annotations

from mesh_mcp.errors import ProtocolError

MAX_NAME = 128  # the records' model-name limit (records.MAX_NAME; records import this module, not the reverse)
PUBLISH_K = 16  # hottest names in a record: ~75 B each (35-char names): 1.2 KB, 1.8 KB with 8 pins
MAX_PINS = 8  # models one node pins (its --model and what it serves; a node serves one or two)
MAX_WIRE = PUBLISH_K + MAX_PINS  # entries in one published view
MAX_RATE = 1_000_000.0  # req/min one entry may claim (16 667 req/s: beyond any node); the wire's cap
MAX_RATE_MILLI = int(MAX_RATE * 1000)
MAX_TIME_S = 10**10  # wall-clock seconds on the wire (year 2286)

Item = tuple[str, int, int, int, bool]  # name, milli-req/min, as_of s, last_wanted s, pinned
_SHAPE = "[name, milli-req/min, as_of, last_wanted, pinned]"


def name_problem(name: object) -> str:
    """What makes `name` unfit for the demand map ('' if fine): the records' limit, printable, no edge spaces."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        return f"a model name must be 1 to {MAX_NAME} characters"
    if not name.isprintable() or name != name.strip():
        return f"model name {name[:40]!r} has control characters or surrounding spaces"
    return ""


def parse(obj: object) -> tuple[Item, ...]:
    """A published view, parsed strictly: ProtocolError on any malformed, duplicate, unsorted or oversized part."""
    if not isinstance(obj, list):
        raise ProtocolError(f"demand view: must be a list of {_SHAPE}")
    if len(obj) > MAX_WIRE:
        raise ProtocolError(f"demand view: {len(obj)} entries, more than the {MAX_WIRE} allowed")
    items: list[Item] = []
    for item in obj:
        if not isinstance(item, list) or len(item) != 5:
            raise ProtocolError(f"demand view: each entry must be {_SHAPE}")
        name, milli, as_of, last, pinned = item
        if problem := name_problem(name):
            raise ProtocolError(f"demand view: {problem}")
        if items and name <= items[-1][0]:
            what = "appears twice" if name == items[-1][0] else f"comes after {items[-1][0][:40]!r}"
            raise ProtocolError(f"demand view {name[:40]!r} {what}: entries are sorted by name, one each")
        for what, value, cap in (("rate", milli, MAX_RATE_MILLI), ("as_of", as_of, MAX_TIME_S)):
            if type(value) is not int or not 0 <= value <= cap:
                raise ProtocolError(f"demand view {name!r}: {what} must be an integer from 0 to {cap}")
        if type(last) is not int or not 0 <= last <= MAX_TIME_S:
            raise ProtocolError(f"demand view {name!r}: last_wanted must be an integer from 0 to {MAX_TIME_S}")
        if as_of > last:
            raise ProtocolError(
                f"demand view {name!r}: as_of {as_of} is after last_wanted {last} (rates are as of a request)"
            )
        if type(pinned) is not bool:
            raise ProtocolError(f"demand view {name!r}: pinned must be a boolean")
        if not (milli or as_of or last or pinned):
            raise ProtocolError(f"demand view {name!r}: an unpinned entry with no rate and no times says nothing")
        items.append((name, milli, as_of, last, pinned))
    if (pins := sum(1 for i in items if i[4])) > MAX_PINS:
        raise ProtocolError(f"demand view: {pins} pins, more than the {MAX_PINS} allowed")
    return tuple(items)


def to_json(items: tuple[Item, ...]) -> list[list[object]]:
    """The JSON-able form of parsed items (a record's wire body)."""
    return [list(i) for i in items]


def problem(items: object) -> str:
    """What is wrong with a record's `demand` value ('' if fine): exactly what `parse` accepts, as a tuple of
    `Item` tuples (the record's signing check: the same parser, no second set of rules)."""
    if not isinstance(items, tuple) or not all(isinstance(i, tuple) for i in items):
        return "demand must be a tuple of (name, milli-req/min, as_of, last_wanted, pinned) tuples"
    try:
        parsed = parse([list(i) for i in items])
    except ProtocolError as exc:
        return str(exc)
    return "" if parsed == items else "demand items must have exactly the parsed types"

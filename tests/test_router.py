"""Routing choices: least in flight, local preferred on ties, sessions sticky across changes."""

from __future__ import annotations

from mesh_mcp.api.router import Candidate, ranked, session_key


def ids(cs: list[Candidate]) -> list[str]:
    return [c.node_id for c in cs]


def test_least_in_flight_then_local_then_id() -> None:
    cs = [Candidate("b", 2), Candidate("a", 1), Candidate("c", 1, local=True), Candidate("d", 0)]
    assert ids(ranked(cs, None)) == ["d", "c", "a", "b"]


def test_sessions_stick_to_one_server_and_only_move_when_it_leaves() -> None:
    servers = [Candidate(f"n{i}", 0) for i in range(5)]
    sessions = [f"user:{i}" for i in range(200)]
    before = {s: ranked(servers, s)[0].node_id for s in sessions}
    assert len(set(before.values())) == 5  # spread over all servers
    # load changes do not move sessions
    busy = [Candidate(c.node_id, 10 if c.node_id == "n1" else 0) for c in servers]
    assert {s: ranked(busy, s)[0].node_id for s in sessions} == before
    # a server leaving moves only its own sessions
    after = {s: ranked([c for c in servers if c.node_id != "n2"], s)[0].node_id for s in sessions}
    moved = {s for s in sessions if before[s] != after[s]}
    assert moved == {s for s in sessions if before[s] == "n2"}


def test_session_key_sources() -> None:
    assert session_key({"user": "alice"}) == "user:alice"
    assert session_key({"metadata": {"user_id": "bob"}}) == "user:bob"
    a = session_key({"messages": [{"role": "user", "content": "hi"}]})
    grown = session_key(
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"},
            ]
        }
    )
    other = session_key({"messages": [{"role": "user", "content": "different"}]})
    assert a is not None and a != other
    assert a == grown  # the same conversation, one turn later
    sys_a = session_key({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]})
    assert sys_a not in (a, None)
    assert session_key({}) is None and session_key({"messages": []}) is None
    assert session_key({"prompt": "The capital"}) is not None

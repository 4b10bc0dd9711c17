"""Blackboard propagation over the in-memory mesh (a small `bench/blackboard_prop.py`): 12 real meshes with real
boards and board links on a fake clock, with per-link latency and lossy links; every post reaches every node and
is found there by search, lost pushes are made good by the anti-entropy sync, and the traffic counters see both."""

from __future__ import annotations

from pathlib import Path

import anyio

from bench.blackboard_prop import Config, pct, simulate


def test_every_post_reaches_every_node_and_is_searchable_despite_lossy_links(tmp_path: Path) -> None:
    cfg = Config(
        nodes=12,
        posts=12,
        rate=4.0,
        loss=0.1,  # a tenth of writes lost: about one push stream in four fails (header, end, reply)
        latency_ms=(10.0, 50.0),
        size=300,
        idle_s=35.0,  # posting starts after start-up's subscriptions (30 s), which push every post once more
        drain_s=60.0,
        scrubber="none",
        charge_cpu=False,  # simulated time only: the same outcome on a loaded machine
        seed=7,
    )
    result = anyio.run(simulate, cfg, tmp_path)

    assert result.missing == 0 and len(result.all_nodes_s) == cfg.posts, "every post stored on every node"
    assert result.searched == cfg.nodes * cfg.posts, "and found there by a search for its word"
    assert len(result.deliveries_s) == cfg.posts * (cfg.nodes - 1)
    # ≤ 32 members: the origin pushes to all of them, one hop; what a lost push misses, the sync brings
    assert result.via_push > 0 and result.via_sync > 0
    assert pct(result.deliveries_s, 50) < 0.2, "most deliveries are one push: 10-50 ms plus the dial"
    assert max(result.all_nodes_s) < cfg.drain_s
    # the counters on the links see the streams: syncs while idle, pushes while posting, none idle
    assert result.idle.streams["bb-sync"] > 0 and result.idle.streams["bb"] == 0 == result.stored.streams["bb"]
    assert result.posting.streams["bb"] > 0 and min(result.posting.bytes["bb"]) > 0

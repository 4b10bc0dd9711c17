"""How a node serves models — decide, then do: `plan.py` decides (pure: solo, pipeline split, expert shards or
standby), `supervisor.py` gathers its inputs and runs what `runners.py` picks (`solo.py`, `split.py`, `moe.py`);
`rpc_worker.py` and `shard_node.py` are the workers' and shard nodes' halves, over one `lease.py`."""

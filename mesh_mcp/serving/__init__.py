"""How a node serves models: pipeline splits and expert shards (the host's and coordinator's
side) and the worker's and shard node's halves."""

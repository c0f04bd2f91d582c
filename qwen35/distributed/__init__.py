"""Tensor and expert parallelism over torch.distributed: process groups and collectives (`parallel.py`) and the
per-layer split of heads, channels, experts and vocabulary with its parallel modules (`shard.py`). Below the models
(the loader reads a rank's slices through it); the workers that run a shard on rank 0's command are the engine's
(`engine/executor.py`)."""

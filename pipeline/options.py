"""Checks of the options a run and a sweep share."""

from __future__ import annotations

from vecpress.kernels.knn import METRICS
from vecpress.pipeline.errors import ConfigError


def check_sizes(*, metric: str, num_train: int, num_queries: int, eval_k: int, shard_rows: int, batch_size: int,
                sample_row_groups: int, ngpu: int) -> None:
    """The options that compress and sweep share: ConfigError naming the first bad one."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    for name, value in (("num_train", num_train), ("num_queries", num_queries), ("eval_k", eval_k),
                        ("shard_rows", shard_rows)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if batch_size < 0:
        raise ConfigError(f"batch_size must be at least 1, or 0 for the automatic size, got {batch_size}")
    if sample_row_groups < 0:
        raise ConfigError(f"sample_row_groups must not be negative, got {sample_row_groups}")
    if ngpu < -1:
        raise ConfigError(f"--ngpu must be -1 (all GPUs), 0 (none) or a count, got {ngpu}")

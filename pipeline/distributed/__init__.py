"""The only place vecpress imports Ray."""

from pipeline.distributed.ray_executor import RayExecutor

__all__ = ["RayExecutor"]

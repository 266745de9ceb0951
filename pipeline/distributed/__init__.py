"""The only place vecpress imports Ray."""

from vecpress.pipeline.distributed.ray_executor import RayExecutor

__all__ = ["RayExecutor"]

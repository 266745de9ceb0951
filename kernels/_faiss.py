"""Import faiss once, with an error that says how to install it."""

from __future__ import annotations

try:
    import faiss  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "vecpress needs faiss: install `vecpress[cpu]` (faiss-cpu) or, on a GPU machine, "
        "`vecpress[gpu]` (faiss-gpu) -- not both, they provide the same `faiss` module"
    ) from exc


def num_gpus(ngpu: int = -1) -> int:
    """GPUs to use: `ngpu=-1` means all that faiss sees; a CPU build sees 0."""
    get = getattr(faiss, "get_num_gpus", None)
    available = int(get()) if get is not None else 0
    return available if ngpu < 0 else min(ngpu, available)

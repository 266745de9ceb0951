"""Trained codecs on storage: content-addressed faiss index files, verified on load."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass

from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.codecs.ivf import IvfModel, is_served_spec
from vecpress.pipeline import storage


@dataclass(frozen=True)
class CodecRef:
    """Where a trained codec lives and what it is; small enough for manifests and task args."""

    uri: str  # a faiss index file (faiss.read_index can load it)
    sha256: str
    spec: str
    metric: str
    dim: int
    code_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def save_codec(codec: Codec | IvfModel, sidecar_uri: str) -> CodecRef:
    """Write `codecs/<sha256>.faiss` under the sidecar folder (idempotent)."""
    data = codec.to_bytes()
    sha = hashlib.sha256(data).hexdigest()
    uri = storage.join(sidecar_uri, "codecs", f"{sha}.faiss")
    if not storage.exists(uri):
        storage.write_bytes(uri, data)
    return CodecRef(uri=uri, sha256=sha, spec=codec.spec, metric=codec.metric, dim=codec.dim,
                    code_size=codec.code_size)


@functools.lru_cache(maxsize=8)
def _load(uri: str, sha256: str, spec: str, metric: str) -> Codec | IvfModel:
    kind = IvfModel if is_served_spec(spec) else Codec  # a served form (IVF...,PQ...) or a codec
    return kind.from_bytes(storage.read_bytes(uri), spec=spec, metric=metric, sha256=sha256)


def load_codec(ref: CodecRef) -> Codec | IvfModel:
    """Read and sha256-verify a codec; cached per process (Ray workers load it once)."""
    return _load(ref.uri, ref.sha256, ref.spec, ref.metric)

"""Trained codecs on storage: content-addressed faiss index files, verified on load."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass

from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.codecs.ivf import IvfModel, is_served_spec
from vecpress.pipeline import storage
from vecpress.pipeline.errors import CorruptFileError
from vecpress.pipeline.storage import one_line


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
    """Write `codecs/<sha256>.faiss` under the sidecar folder (idempotent; a damaged copy
    there, which no longer matches its name, is replaced)."""
    data = codec.to_bytes()
    sha = hashlib.sha256(data).hexdigest()
    uri = storage.join(sidecar_uri, "codecs", f"{sha}.faiss")
    if not storage.exists(uri) or hashlib.sha256(storage.read_bytes(uri)).hexdigest() != sha:
        storage.write_bytes(uri, data)
    return CodecRef(uri=uri, sha256=sha, spec=codec.spec, metric=codec.metric, dim=codec.dim,
                    code_size=codec.code_size)


@functools.lru_cache(maxsize=8)
def _load(uri: str, sha256: str, spec: str, metric: str) -> Codec | IvfModel:
    kind = IvfModel if is_served_spec(spec) else Codec  # a served form (IVF...,PQ...) or a codec
    try:
        data = storage.read_bytes(uri)
    except OSError as exc:
        raise CorruptFileError(f"{uri}: cannot read the trained codec {spec}: {one_line(exc)}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise CorruptFileError(f"{uri}: the trained codec {spec} does not match its checksum ({len(data)} bytes, "
                               f"sha256 {got[:16]}..., the manifest's {sha256[:16]}...): the file was altered or "
                               "damaged since it was written; rebuild the table with --mode full")
    try:
        return kind.from_bytes(data, spec=spec, metric=metric)  # (its checksum checked above)
    except (ValueError, RuntimeError) as exc:  # (faiss's errors are RuntimeErrors of many lines)
        raise CorruptFileError(f"{uri}: the trained codec {spec} cannot be read: {one_line(exc)}") from None


def load_codec(ref: CodecRef) -> Codec | IvfModel:
    """Read and sha256-verify a codec; cached per process (Ray workers load it once)."""
    return _load(ref.uri, ref.sha256, ref.spec, ref.metric)

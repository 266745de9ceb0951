"""What every stage of a run knows: where the output is, which table, the run's id and folder,
and the lease it holds. Arrays travel between stages as files in the run's folder; these are
the helpers that write and read them, and that make a manifest's paths relative to OUT."""

from __future__ import annotations

import datetime as dt
import io
import uuid
from dataclasses import dataclass

import numpy as np

from vecpress.pipeline import storage
from vecpress.pipeline.codec_store import CodecRef
from vecpress.pipeline.errors import ConfigError, VecpressError
from vecpress.pipeline.lance_io import sidecar_uri, table_uri
from vecpress.pipeline.locking import LeaseRef


@dataclass(frozen=True)
class RunContext:
    out: str
    table: str
    run_id: str
    #: the table lease the run holds (run_compress takes it); its commit checks it is still held
    lease: LeaseRef | None = None

    @classmethod
    def new(cls, out: str, table: str, run_id: str | None = None) -> "RunContext":
        if storage.is_file(out):
            raise ConfigError(f"{out}: the output must be a folder (a LanceDB database), and this is a file")
        table_uri(out, table)  # checks the name before anything is written
        return cls(storage.normalize(out), table, run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-")
                   + uuid.uuid4().hex[:8])

    @property
    def table_uri(self) -> str:
        return table_uri(self.out, self.table)

    @property
    def sidecar(self) -> str:
        return sidecar_uri(self.out, self.table)

    def run_file(self, name: str) -> str:
        return storage.join(self.sidecar, "runs", self.run_id, name)

    def relative(self, uri: str) -> str:
        """A path under OUT relative to it (query strings of object-store URIs dropped), so the
        manifest stays valid if OUT moves and never records endpoints or options."""
        base, path = self.out.split("?", 1)[0].rstrip("/"), uri.split("?", 1)[0]
        if not path.startswith(base + "/"):
            raise VecpressError(f"{path} is not under the output {base}")
        return path[len(base) + 1:]


def manifest_codec(out: str, entry: dict | None) -> CodecRef | None:
    """A codec entry of a version's manifest (uri relative to OUT) as a loadable CodecRef."""
    if entry is None:
        return None
    return CodecRef(**{**entry, "uri": storage.join(storage.normalize(out), entry["uri"])})


def save_array(uri: str, a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def load_array(uri: str) -> np.ndarray:
    with storage.open_input(uri) as f:
        return np.load(f, allow_pickle=False)


def save_arrays(uri: str, arrays: dict[str, np.ndarray]) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def load_arrays(uri: str) -> dict[str, np.ndarray]:
    with storage.open_input(uri) as f, np.load(f, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}

"""The output Lance dataset: locating it, checking compatibility and reading a version's
manifest back (the one atomic commit is stages/s07_commit.py's).

Layout under OUT (a LanceDB database directory):
    OUT/<table>.lance                 the compressed dataset (one version per run)
    OUT/<table>_eval.lance            evaluation results, one row per version (LanceDB table)
    OUT/_vecpress/<table>/codecs/     trained codecs, <sha256>.faiss
    OUT/<table>.lance/tree/failed-<run id>/  a version that failed the gate (a branch: pipeline.gated)
    OUT/_vecpress/<table>/runs/<id>/  per-run manifest, plan, held-out queries (pipeline.tidy prunes them)
    OUT/_vecpress/<table>/eval/       evaluation JSON per version
"""

from __future__ import annotations

import json
import logging
import re

import lance
import pyarrow as pa

from vecpress.pipeline import storage
from vecpress.pipeline.errors import ConfigError, OutputConflictError, VecpressError
from vecpress.pipeline.schema import MANIFEST_METADATA_KEY, SIDECAR_DIR, same_columns

log = logging.getLogger("vecpress")

#: the tag of the version readers get by default (the last one that passed the quality gate)
PRODUCTION_TAG = "production"
#: tags of versions that failed the gate: `failed-<run id>` (a branch of that name holds it; or a
#: main version restored over, one an older vecpress committed before its gate: pipeline.gated)
FAILED_TAG_PREFIX = "failed-"

#: a table name, matched whole (fullmatch: `$` would also accept a trailing newline)
_TABLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}")


def check_table_name(table: str) -> str:
    """`table` when it is a valid table name, else ConfigError: the one check of table names,
    made by every command before anything is written (a name is a folder, OUT/<table>.lance)."""
    if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table) or table.endswith("_eval"):
        raise ConfigError(f"invalid table name {table!r} (--table): use letters, digits, '_' and '-' "
                          "(at most 128, not starting with '-', not ending in '_eval')")
    return table


def table_uri(out: str, table: str) -> str:
    return storage.join(out, f"{check_table_name(table)}.lance")


def sidecar_uri(out: str, table: str) -> str:
    return storage.join(out, SIDECAR_DIR, check_table_name(table))


def open_dataset(out: str, table: str, version: int | str | None = None) -> lance.LanceDataset | None:
    """The table at `version` (default latest), or None when the table does not exist."""
    uri = table_uri(out, table)
    if not storage.exists(storage.join(uri, "_versions")):  # workers' uncommitted files don't count
        return None
    try:
        return open_lance(uri, version)
    except ValueError as exc:
        if version is not None:
            try:
                latest = open_lance(uri)
                have, tags = sorted(v["version"] for v in latest.versions()), sorted(latest.tags.list())
            except (ValueError, OSError):
                have, tags = [], []
            known = f"versions {_ranges(have)}" + (f", tags {', '.join(tags)}" if tags else "")
            raise VecpressError(f"{uri}: no version {version!r} (it has {known})") from exc
        raise


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out) or "none"


def open_lance(uri: str, version: int | str | None = None) -> lance.LanceDataset:
    """lance.dataset for a local path or an object-store URI (options from its query string)."""
    target, options = storage.lance_location(uri)
    return lance.dataset(target, version=version, storage_options=options)


def require_dataset(out: str, table: str, version: int | str | None = None) -> lance.LanceDataset:
    """The table at `version`; without one, the version readers get by default (`default_ref`)."""
    ds = open_dataset(out, table, version)
    if ds is None:
        raise VecpressError(f"no table {table!r} in {out} (expected {table_uri(out, table)})")
    if version is None:
        ref = default_ref(ds)
        if ref is not None:
            ds = open_dataset(out, table, ref)
    return ds


def default_ref(ds: lance.LanceDataset) -> str | None:
    """What `vecpress search/evaluate/inspect` read without --version: the `production` tag
    (the last version that passed the quality gate), else None (the latest version, which
    then is the last good one: a version that fails the gate never becomes latest for long).
    A table whose latest version holds no vecpress data (created by a first run that failed
    the gate) gives a one-line VecpressError naming the failed versions' tags."""
    tags = ds.tags.list()
    if PRODUCTION_TAG in tags:
        return PRODUCTION_TAG
    if MANIFEST_METADATA_KEY not in (ds.schema.metadata or {}):
        failed = sorted(t for t in tags if t.startswith(FAILED_TAG_PREFIX))
        if failed:
            raise VecpressError(f"{ds.uri}: no version has passed the quality gate yet (version {ds.version} holds "
                                f"no data); the failed ones are tags {', '.join(failed)}: pass --version TAG")
    return None


def version_ref(ds: lance.LanceDataset, asked: int | str | None) -> int | str:
    """How to open `ds`'s version again elsewhere (a worker): its number on the main branch,
    or the tag it was opened by when that tag names a version on another branch (whose
    numbers are its own)."""
    if isinstance(asked, str):
        tag = ds.tags.list().get(asked) or {}
        if tag.get("branch"):
            return asked
    return ds.version


def check_compatible(out: str, table: str, schema: pa.Schema, *, allow_schema_change: bool = False) -> int | None:
    """The latest version of an existing table (None if there is none), or OutputConflictError
    if it has another schema and `allow_schema_change` is off."""
    ds = open_dataset(out, table)
    if ds is None:
        return None
    if not same_columns(ds.schema, schema) and not allow_schema_change:
        have = ", ".join(f"{f.name}: {f.type}" for f in ds.schema)
        want = ", ".join(f"{f.name}: {f.type}" for f in schema)
        raise OutputConflictError(
            f"{table_uri(out, table)} exists with another schema ({ds.count_rows()} rows; has [{have}], "
            f"this run writes [{want}]); choose another --table or pass --allow-schema-change")
    return ds.version


def version_manifest(ds: lance.LanceDataset) -> dict:
    """The vecpress manifest stored in a version's schema metadata."""
    raw = (ds.schema.metadata or {}).get(MANIFEST_METADATA_KEY)
    if raw is None:
        raise VecpressError(f"{ds.uri} version {ds.version} was not written by vecpress (no manifest)")
    return json.loads(raw)


def fragment_offsets(ds: lance.LanceDataset) -> list[tuple[int, int, int]]:
    """[(fragment id, global position of its first row, rows)] in dataset order."""
    out, offset = [], 0
    for frag in ds.get_fragments():
        n = frag.count_rows()
        out.append((frag.fragment_id, offset, n))
        offset += n
    return out


def read_run_file(out: str, rel: str, *, needed_for: str) -> bytes:
    """A file of a version's run folder (`rel`: relative to OUT, as manifests hold them); a
    one-line VecpressError when it is gone (the run folder removed by hand)."""
    uri = storage.join(storage.normalize(out), rel)
    if not storage.exists(uri):
        raise VecpressError(f"{uri} is missing (its run folder was removed?): {needed_for} needs it")
    return storage.read_bytes(uri)

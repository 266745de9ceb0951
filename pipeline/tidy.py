"""Leftovers: what failed and interrupted runs leave in the table's folder, and run folders past
their use.

- `sweep_table`: files in the table's folder that no version references -- data files of
  fragments that encode tasks wrote and no commit took (a failed or interrupted run), index
  files of segments never committed, staging files of interrupted writes (`<name>#<n>` on local
  disks). Only with the table's lease held: another run's uncommitted files look the same.
- `discard_run`: after a failed run, its own run folder (when it committed nothing) or its
  working files (the training sample, shard checkpoints, index buffers).
- `prune_runs`: run folders that no kept version's manifest points at (a version's held-out
  queries, their ground truth, its plan: small), and failed versions past the retention rule.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os

from pyarrow.fs import FileSelector, FileType

from vecpress.pipeline import storage
from vecpress.pipeline.lance_io import FAILED_TAG_PREFIX, open_dataset, open_lance, sidecar_uri, table_uri
from vecpress.pipeline.schema import MANIFEST_METADATA_KEY, RUN_ID_PROPERTY, SIDECAR_DIR

log = logging.getLogger("vecpress")

#: a run's working files, of no use once the run is over (the training sample: raw vectors)
WORKING_FILES = ("train.npy", "shards", "index-buffers", "ids", "lists/parts")


def sweep_table(out: str, table: str) -> dict:
    """Remove the files of the table's folder that no version references (uncommitted
    fragments, index segments and transactions of failed or interrupted runs, staging files).
    The caller holds the table's lease. Returns what was removed."""
    removed = {"data_files": 0, "index_files": 0, "staging_files": 0, "bytes": 0,
               "detached_manifests": remove_detached_manifests(out, table)}
    ds = open_dataset(out, table)
    if ds is None and storage.exists(table_uri(out, table)):  # no version: all of it is uncommitted
        loc = storage.resolve(table_uri(out, table))
        removed["data_files"] = sum(1 for f in loc.fs.get_file_info(FileSelector(loc.path, recursive=True))
                                    if f.type == FileType.File and f.path.endswith(".lance"))
        storage.remove_tree(table_uri(out, table))
    elif ds is not None:
        # no version is old enough to go (retention is apply_retention's); unreferenced files go
        # at once, not after Lance's 7 days: with the lease held, none is another run's
        stats = ds.cleanup_old_versions(older_than=dt.timedelta(days=365 * 100), delete_unverified=True,
                                        error_if_tagged_old_versions=False)
        removed.update(data_files=int(getattr(stats, "data_files_removed", 0)),
                       index_files=int(getattr(stats, "index_files_removed", 0)),
                       bytes=int(getattr(stats, "bytes_removed", 0)))
    loc = storage.resolve(table_uri(out, table))
    if not loc.scheme and os.path.isdir(loc.path):  # object_store's local staging files: `<name>#<n>`
        for root, _, files in os.walk(loc.path):
            for name in files:
                if "#" in name:
                    path = os.path.join(root, name)
                    removed["bytes"] += os.path.getsize(path)
                    os.unlink(path)
                    removed["staging_files"] += 1
    if removed["data_files"] or removed["index_files"] or removed["staging_files"]:
        log.warning("removed leftovers of failed or interrupted runs from %s: %d data files, %d index files, %d "
                    "staging files (%d bytes)", table_uri(out, table), removed["data_files"], removed["index_files"],
                    removed["staging_files"], removed["bytes"])
    return removed


def remove_detached_manifests(out: str, table: str) -> int:
    """Remove the manifests of detached versions (`_versions/d<n>.manifest`: a served run's
    candidates, pipeline.gated), which Lance's cleanup keeps forever. With the lease held none
    is in use: a promoted candidate's data is main's version now, a failed one's its branch's,
    and a crashed run's is a leftover (its files go with the sweep that follows). Returns how
    many were removed."""
    loc = storage.resolve(storage.join(table_uri(out, table), "_versions"))
    try:
        infos = loc.fs.get_file_info(FileSelector(loc.path, allow_not_found=True))
    except OSError:
        return 0
    detached = [f.path for f in infos if f.type == FileType.File and f.base_name.startswith("d")
                and f.base_name.endswith(".manifest")]
    for path in detached:
        loc.fs.delete_file(path)
    return len(detached)


def runs_uri(out: str, table: str) -> str:
    return storage.join(sidecar_uri(out, table), "runs")


def committed_by(out: str, table: str, run_id: str) -> int | None:
    """The version a run already committed (retries must not commit twice), else None."""
    ds = open_dataset(out, table)
    if ds is None:
        return None
    for v in sorted((v["version"] for v in ds.versions()), reverse=True)[:20]:
        tx = ds.read_transaction(v)
        if tx is not None and (tx.transaction_properties or {}).get(RUN_ID_PROPERTY) == run_id:
            return v
    return None


def committed_anything(out: str, table: str, run_id: str) -> bool:
    """Whether a run committed a version (on the main branch or, failing the gate, its own)."""
    ds = open_dataset(out, table)
    if ds is None:
        return False
    return f"{FAILED_TAG_PREFIX}{run_id}" in ds.tags.list() or committed_by(out, table, run_id) is not None


def discard_run(out: str, table: str, run_id: str) -> None:
    """After a failed run: its run folder when it committed nothing, else its working files."""
    folder = storage.join(runs_uri(out, table), run_id)
    if not committed_anything(out, table, run_id):
        storage.remove_tree(folder)
        return
    for name in WORKING_FILES:
        remove(storage.join(folder, name))


def remove(uri: str) -> None:
    """Remove a file or a folder (nothing when it does not exist)."""
    loc = storage.resolve(uri)
    info = loc.fs.get_file_info(loc.path)
    if info.type == FileType.Directory:
        loc.fs.delete_dir(loc.path)
    elif info.type == FileType.File:
        loc.fs.delete_file(loc.path)


def _manifest(ds) -> dict | None:
    raw = (ds.schema.metadata or {}).get(MANIFEST_METADATA_KEY)
    return None if raw is None else json.loads(raw)


def _run_folders(manifest: dict | None, table: str) -> set[str]:
    """The run folders a manifest points at (its own; an incremental version's also the one
    whose training rows it carries). Its uris are relative to OUT."""
    if manifest is None:
        return set()
    runs = f"{SIDECAR_DIR}/{table}/runs/"
    found = {manifest["run_id"]}

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v.startswith(runs):
            found.add(v[len(runs):].split("/", 1)[0])

    walk({k: manifest.get(k) for k in ("source", "sample", "advisor")})
    return found


def prune_runs(out: str, table: str, run_id: str, keep_versions: int) -> dict:
    """Retention for what lives beside the table (after apply_retention): failed versions
    beyond the newest `keep_versions` (their tag, branch and evaluation), failed branches whose
    main version is gone, and run folders no kept version points at (the current run's stays).
    keep_versions 0 keeps every failed version."""
    ds = open_dataset(out, table)
    if ds is None:
        return {}
    uri = table_uri(out, table)
    tags = ds.tags.list()
    versions = {v["version"] for v in ds.versions()}
    failed = sorted((t for t in tags if t.startswith(FAILED_TAG_PREFIX)), key=lambda t: tags[t].get("created_at")
                    or dt.datetime.min.replace(tzinfo=dt.timezone.utc), reverse=True)
    branches = ds.branches.list()
    dropped = []
    for i, tag in enumerate(failed):
        parent_gone = tag in branches and branches[tag].get("parent_version") not in versions
        if (keep_versions and i >= keep_versions) or parent_gone:
            ds.tags.delete(tag)
            if tag in branches:
                ds.branches.delete(tag)
            remove(storage.join(sidecar_uri(out, table), "eval", f"version-{tag}.json"))
            dropped.append(tag)
    for name in branches:  # a failed version's branch whose commit or tag never landed (a crash)
        if name.startswith(FAILED_TAG_PREFIX) and name not in tags and name != f"{FAILED_TAG_PREFIX}{run_id}":
            ds.branches.delete(name)
            dropped.append(name)
    keep = {run_id}
    for v in versions:
        keep |= _run_folders(_manifest(open_lance(uri, v)), table)
    for tag in failed:
        if tag not in dropped:
            keep |= _run_folders(_manifest(open_lance(uri, tag)), table)
    loc = storage.resolve(runs_uri(out, table))
    removed = []
    if loc.fs.get_file_info(loc.path).type == FileType.Directory:
        for info in loc.fs.get_file_info(FileSelector(loc.path)):
            name = info.base_name
            if info.type == FileType.Directory and name not in keep:
                loc.fs.delete_dir(info.path)
                removed.append(name)
    if removed or dropped:
        log.info("retention: removed %d run folders and %d failed versions (%s)", len(removed), len(dropped),
                 ", ".join(dropped) or "-")
    return {"run_folders_removed": len(removed), "failed_versions_removed": dropped}

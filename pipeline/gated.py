"""Gated visibility: a version that fails the quality gate is never what a reader gets by default.

Readers by default get the table's latest version (`lancedb.connect(out).open_table(t)`) or
its `production` tag (`vecpress search/evaluate/inspect`, lance_io.default_ref). So:

- A codes table's run has its recall in hand before the commit (the encode pass searched the
  held-out queries over the codes), and decides the gate then. A version that passes is
  committed on the main branch and tagged `production`. One that fails is committed on a
  Lance branch `failed-<run id>` (tagged the same), never on main: main's latest stays the
  last good version, with no window at all. The failed version stays inspectable
  (`vecpress inspect --version failed-<run id>`); its new data files move into the branch's
  folder (`<table>.lance/tree/failed-<run id>/data`), where the main branch's cleanup never
  looks; its kept fragments are the main version's own files.
- A LanceDB-served table's recall is LanceDB's search over the committed index, which needs a
  committed version: the run commits the data and the index on main, measures LanceDB's
  search at its defaults (what the gate reads) and gates at once; after a failed gate it tags
  that version `failed-<run id>` and commits a restore of the last good version, so latest
  serves the good data again, and only then measures the grid of search settings. The window
  in which LanceDB readers of latest see the failed data is the index build plus that one
  search of the held-out queries (2.2 s for 60,000 x 64-d rows and 500 queries on 2 cores;
  26 s when the whole evaluation ran first); `production` never moves to it.
- A first run on a new table that fails the gate leaves the table created with no rows (an
  empty version: readers get an empty table, `vecpress search` says no version passed yet),
  the failed data on its branch (codes) or tagged (served).
"""

from __future__ import annotations

import json
import logging

import lance
import pyarrow as pa
from lance.fragment import FragmentMetadata

from vecpress.pipeline import storage
from vecpress.pipeline.lance_io import FAILED_TAG_PREFIX, open_dataset, open_lance, table_uri
from vecpress.pipeline.schema import MANIFEST_METADATA_KEY, RUN_ID_PROPERTY

log = logging.getLogger("vecpress")


def failed_tag(run_id: str) -> str:
    return f"{FAILED_TAG_PREFIX}{run_id}"


def commit_empty(out: str, table: str, schema: pa.Schema, read_version: int | None) -> int:
    """A version with the table's columns and no rows (and no manifest): what readers of latest
    get when no version has passed the gate yet."""
    schema = schema.with_metadata({k: v for k, v in (schema.metadata or {}).items() if k != MANIFEST_METADATA_KEY})
    target, options = storage.lance_location(table_uri(out, table))
    tx = lance.Transaction(read_version=read_version or 0, operation=lance.LanceOperation.Overwrite(schema, []))
    return lance.LanceDataset.commit(target, tx, read_version=read_version, storage_options=options).version


def commit_failed(out: str, table: str, schema: pa.Schema, fragments: list[dict], *, run_id: str,
                  read_version: int | None, num_kept: int) -> tuple[str, int]:
    """Commit a codes table's version that failed the gate on the branch `failed-<run id>` of
    the main version it was read from (tagged the same): (tag, its version on the branch).
    The first `num_kept` fragments are the main version's (referenced where they are); the
    others' files move into the branch's folder. Once per run id (a retry finds the tag)."""
    uri = table_uri(out, table)
    tag = failed_tag(run_id)
    ds = open_dataset(out, table)
    if ds is not None and tag in ds.tags.list():
        return tag, ds.tags.list()[tag]["version"]
    if ds is None:  # a new table: created empty, the failed version a branch of that
        read_version = commit_empty(out, table, schema, None)
        ds = open_lance(uri)
    elif read_version is None:
        read_version = ds.version
    if tag in ds.branches.list():  # a retry: the branch is there, maybe with the commit too
        branch = ds.checkout_version((tag, None))
        tx = branch.read_transaction(branch.version)
        if tx is not None and (tx.transaction_properties or {}).get(RUN_ID_PROPERTY) == run_id:
            open_lance(uri).tags.create(tag, (tag, branch.version))
            return tag, branch.version
    else:
        branch = ds.create_branch(tag, read_version)
    root = next((b.id for b in branch.base_paths().values() if b.is_dataset_root), 0)
    branch_data = storage.join(uri, "tree", tag, "data")
    frags = []
    for i, f in enumerate(fragments):
        f = json.loads(json.dumps(f))
        for file in f["files"]:
            if i < num_kept:
                file["base_id"] = root  # the main version's file, where it is
            else:
                _move(storage.join(uri, "data", file["path"]), storage.join(branch_data, file["path"]))
        frags.append(FragmentMetadata.from_json(json.dumps(f)))
    tx = lance.Transaction(read_version=branch.version, operation=lance.LanceOperation.Overwrite(schema, frags),
                           transaction_properties={RUN_ID_PROPERTY: run_id})
    _, options = storage.lance_location(uri)  # (the branch's uri has no query string: the table's options)
    done = lance.LanceDataset.commit(branch.uri, tx, read_version=branch.version, storage_options=options)
    open_lance(uri).tags.create(tag, (tag, done.version))
    log.warning("version %d of branch %s holds the run's data (tag %s); the table's latest version stays %d",
                done.version, tag, tag, read_version)
    return tag, done.version


def _move(src: str, dst: str) -> None:
    """Move a file (again: a retried commit finds it moved already)."""
    if not storage.exists(src) and storage.exists(dst):
        return
    s, d = storage.resolve(src), storage.resolve(dst)
    d.fs.create_dir(d.path.rsplit("/", 1)[0], recursive=True)
    s.fs.move(s.path, d.path)


def restore_after_failure(out: str, table: str, run_id: str, failed_version: int, good_version: int | None) -> int:
    """A LanceDB-served table's version failed the gate after its commit: tag it
    `failed-<run id>` and make the last good version (`good_version`, or an empty one when
    there is none) the latest again. Returns the new latest version."""
    ds = open_lance(table_uri(out, table))
    tag = failed_tag(run_id)
    if tag not in ds.tags.list():
        ds.tags.create(tag, failed_version)
    if good_version is None:
        version = commit_empty(out, table, ds.schema, ds.version)
    else:
        good = open_lance(table_uri(out, table), good_version)
        good.restore()
        version = open_lance(table_uri(out, table)).version
    log.warning("version %d failed the gate (tag %s): latest is version %d again, %s", failed_version, tag, version,
                "with no rows (no version has passed yet)" if good_version is None else
                f"a restore of version {good_version}")
    return version


def replace_failed(out: str, table: str, committed, decision: dict) -> dict:
    """A LanceDB-served version (`committed`, on main) failed the gate: restore the last good
    one as the latest (restore_after_failure), and give the restored version that one's
    evaluation, so that the next run does not evaluate it again. Returns the decision's new
    fields (failed_tag, restored_version, reason)."""
    from vecpress.pipeline.report import eval_uri, load_eval

    good = decision["previous_version"]
    run_id = committed.manifest["run_id"]
    latest = restore_after_failure(out, table, run_id, committed.version, good)
    if good is not None and (good_ev := load_eval(out, table, good)) is not None:
        restored = {**good_ev, "version": latest, "gate": {
            **(good_ev.get("gate") or {}), "passed": True, "restored_from": good,
            "reason": f"a restore of version {good}, after version {committed.version} failed the gate"}}
        storage.write_bytes(eval_uri(out, table, latest), json.dumps(restored, indent=1).encode())
    what = "no rows (no version has passed yet)" if good is None else f"version {good}"
    return {"failed_tag": failed_tag(run_id), "restored_version": latest,
            "reason": decision["reason"] + f"; version {latest} restores {what} as the latest"}

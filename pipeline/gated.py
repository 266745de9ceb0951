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
- A LanceDB-served table's recall is LanceDB's search over the built index, so its run builds
  a candidate first: the rows, then the index over them, as detached commits (Lance's
  `commit(..., detached=True)`: versions outside main's history, which no reader of latest,
  of a tag or of the version list ever gets; LanceDB opens one only when asked for its
  number). LanceDB's search of the candidate at its defaults decides the gate. A candidate
  that passes becomes main's latest in one commit, a Lance `Restore` of the detached version
  (its manifest as main's next version: the same data files, fragment ids and index, nothing
  copied), tagged with the run id so that a retry does not promote twice. One that fails is
  moved onto the branch `failed-<run id>` (its new data files and index files into the
  branch's folder, as a codes table's failed version; its fragments and index as they were)
  and tagged the same; main never changed. Main's cleanup does not keep a detached version's
  files, tagged or not: a crashed run's candidate is swept by the next run, as its
  uncommitted fragments are.
- A first run on a new table commits an empty version first (readers get an empty table,
  `vecpress search` says no version passed yet); a run that fails the gate leaves the table
  so, its failed data on its branch.
- A LanceDB-served version that reached main unevaluated by an older vecpress (which committed
  before the gate) and fails the gate when the next run finishes it is tagged
  `failed-<run id>` and the last good version restored over it (`replace_failed`).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import lance
import pyarrow as pa
from lance.fragment import FragmentMetadata
from pyarrow.fs import FileSelector, FileType

from vecpress.pipeline import storage
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.lance_io import FAILED_TAG_PREFIX, open_dataset, open_lance, table_uri
from vecpress.pipeline.schema import MANIFEST_METADATA_KEY, RUN_ID_PROPERTY
from vecpress.pipeline.tidy import committed_by

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


def commit_overwrite(out: str, table: str, schema: pa.Schema, fragments: list[dict], *, run_id: str,
                     read_version: int | None, detached: bool = False) -> int:
    """Make the written fragments the table's new version, atomically, once per run id (a
    run that already committed gets that version); `detached`: a version outside main's
    history (Lance's detached commit), which no reader of latest sees."""
    done = committed_by(out, table, run_id)
    if done is not None:
        log.info("run %s already committed version %d; not committing again", run_id, done)
        return done
    frags = [FragmentMetadata.from_json(json.dumps(f)) for f in fragments]
    tx = lance.Transaction(read_version=read_version or 0, operation=lance.LanceOperation.Overwrite(schema, frags),
                           transaction_properties={RUN_ID_PROPERTY: run_id})
    uri = table_uri(out, table)
    target, options = storage.lance_location(uri)
    with storage.writing(uri, "the candidate version" if detached else "the new version"):
        return lance.LanceDataset.commit(target, tx, read_version=read_version, storage_options=options,
                                         detached=detached).version


def commit_candidate(out: str, table: str, schema: pa.Schema, fragments: list[dict], *, run_id: str,
                     read_version: int | None) -> int:
    """A LanceDB-served run's rows as a detached version of the main version they were read
    from (the candidate: no reader of latest sees it): its number. On a new table, an empty
    version first (Lance commits no detached version where there is none). A run that already
    promoted its candidate (a retry, a resumed run) gets main's version instead."""
    if read_version is None and committed_by(out, table, run_id) is None:
        ds = open_dataset(out, table)
        read_version = ds.version if ds is not None else commit_empty(out, table, schema, None)
    return commit_overwrite(out, table, schema, fragments, run_id=run_id, read_version=read_version, detached=True)


def settled(out: str, table: str, run_id: str) -> tuple[int, str | None] | None:
    """Where a run's served candidate went once gated: (main's version that promoted it, None),
    or (its version on the branch, the tag `failed-<run id>`); None while it is still a
    candidate (or there is none)."""
    ds = open_dataset(out, table)
    if ds is None:
        return None
    tag, tags = failed_tag(run_id), ds.tags.list()
    if tag in tags:
        return tags[tag]["version"], tag
    done = committed_by(out, table, run_id)
    return None if done is None else (done, None)


def promote(out: str, table: str, candidate: int, *, run_id: str) -> int:
    """Make a candidate that passed the gate main's latest version, in one commit: a Restore of
    the detached version (its data files, fragments and index as they are). Returns main's new
    version; once per run id."""
    done = committed_by(out, table, run_id)
    if done is not None:
        return done
    uri = table_uri(out, table)
    target, options = storage.lance_location(uri)
    latest = open_lance(uri).version
    tx = lance.Transaction(read_version=latest, operation=lance.LanceOperation.Restore(candidate),
                           transaction_properties={RUN_ID_PROPERTY: run_id})
    with storage.writing(uri, "the new version"):
        return lance.LanceDataset.commit(target, tx, read_version=latest, storage_options=options).version


def commit_failed_candidate(out: str, table: str, candidate: int, *, run_id: str) -> tuple[str, int]:
    """A candidate that failed the gate onto the branch `failed-<run id>` (commit_failed: its new
    files and its index moved into the branch's folder); main never changed. Its fragments that
    main's latest version holds (an incremental run's kept ones, first) stay where they are."""
    uri = table_uri(out, table)
    cand, main = open_lance(uri, candidate), open_lance(uri)  # (the run holds the lease: main is what it read)
    mine = {f.path for frag in main.get_fragments() for f in frag.data_files()}
    frags = cand.get_fragments()
    num_kept = next((i for i, f in enumerate(frags) if not {d.path for d in f.data_files()} <= mine), len(frags))
    indices = getattr(cand.read_transaction(candidate).operation, "new_indices", None)
    return commit_failed(out, table, cand.schema, [f.metadata.to_json() for f in frags], run_id=run_id,
                         read_version=main.version, num_kept=num_kept, indices=indices)


def commit_failed(out: str, table: str, schema: pa.Schema, fragments: list[dict], *, run_id: str,
                  read_version: int | None, num_kept: int, indices: list | None = None) -> tuple[str, int]:
    """Commit a version that failed the gate on the branch `failed-<run id>` of the main
    version it was read from (tagged the same): (tag, its version on the branch).
    The first `num_kept` fragments are the main version's (referenced where they are); the
    others' files move into the branch's folder. `indices` (a served candidate's index
    segments, built over these fragments in this order) move there too and are committed over
    them. Once per run id (a retry finds the tag)."""
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
    # (a branch checked out from the table keeps the table's uri: commits go to the branch's own)
    branch_uri, options = storage.lance_location(storage.join(uri, "tree", tag))
    done = None
    if tag in ds.branches.list():  # a retry: the branch is there, maybe with the commit too
        branch = ds.checkout_version((tag, None))
        tx = branch.read_transaction(branch.version)
        if tx is not None and (tx.transaction_properties or {}).get(RUN_ID_PROPERTY) == run_id:
            done = branch
    else:
        branch = ds.create_branch(tag, read_version)
    if done is None:
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
        done = lance.LanceDataset.commit(branch_uri, tx, read_version=branch.version, storage_options=options)
    if indices and not done.list_indices():
        done = _commit_branch_index(uri, tag, done, indices, len(fragments), run_id=run_id)
    open_lance(uri).tags.create(tag, (tag, done.version))
    log.warning("version %d of branch %s holds the run's data (tag %s); the table's latest version stays %d",
                done.version, tag, tag, read_version)
    return tag, done.version


def _commit_branch_index(uri: str, tag: str, branch: lance.LanceDataset, indices: list, num_fragments: int, *,
                         run_id: str) -> lance.LanceDataset:
    """Move a candidate's index segments (`indices`, Lance's Index records, their files under
    the table's `_indices/<uuid>`) into the branch's folder and commit them over its version.
    Their row ids name fragment ids: the branch's must be the candidate's (both numbered on
    from the same main version)."""
    have = [f.fragment_id for f in branch.get_fragments()]
    want = sorted(set().union(*(set(i.fragment_ids) for i in indices)))
    if len(have) != num_fragments or not set(want) <= set(have):
        raise VecpressError(f"{uri} branch {tag}: fragments {have} are not the failed candidate's {want} (did the "
                            "table change during the run?); the candidate's index is not committed there")
    for index in indices:
        src = storage.join(uri, "_indices", index.uuid)
        for name in [f.path for f in index.files or []] or _list(src):
            _move(storage.join(src, name), storage.join(uri, "tree", tag, "_indices", index.uuid, name))
    tx = lance.Transaction(read_version=branch.version, transaction_properties={RUN_ID_PROPERTY: run_id},
                           operation=lance.LanceOperation.CreateIndex(
                               [dataclasses.replace(i, base_id=None) for i in indices], []))
    branch_uri, options = storage.lance_location(storage.join(uri, "tree", tag))
    return lance.LanceDataset.commit(branch_uri, tx, read_version=branch.version, storage_options=options)


def _list(folder: str) -> list[str]:
    loc = storage.resolve(folder)
    return [i.path[len(loc.path.rstrip("/")) + 1:] for i in loc.fs.get_file_info(FileSelector(loc.path, recursive=True))
            if i.type == FileType.File]


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

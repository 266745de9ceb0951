"""Recall of a version: the search over its codes against the exact neighbours of its
held-out queries, with and without exact re-ranking, and the codec's reconstruction error.

A run measures it while it encodes (the encode pass searches the queries over the codes it
holds); `evaluate_version` reads those results back, or searches the stored codes again."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from vecpress.kernels.knn import TopK, prepare_vectors
from vecpress.kernels.metrics import recall_table, relative_error
from vecpress.pipeline import storage
from vecpress.pipeline.codec_store import CodecRef, load_codec
from vecpress.pipeline.context import load_array, manifest_codec
from vecpress.pipeline.errors import ConfigError, VecpressError
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.lance_io import (
    fragment_offsets, open_lance, read_run_file, require_dataset, table_uri, version_manifest, version_ref,
)
from vecpress.pipeline.lists import measure_nprobes, version_lists
from vecpress.pipeline.rerank import column_distances, source_distances
from vecpress.pipeline.rowmap import RowMap
from vecpress.pipeline.schema import CODE_COLUMN, codes_as_numpy
from vecpress.pipeline.served import evaluate_served
from vecpress.pipeline.layout import SourcePlan


@dataclass(frozen=True)
class CodeSearch:
    table_uri: str
    #: a version number, or the tag of a version on another branch (lance_io.version_ref)
    version: int | str
    codec: CodecRef
    k: int


def search_fragment(item: tuple[int, int], *, job: CodeSearch, queries: np.ndarray,
                    query_positions: np.ndarray | None = None,
                    allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ADC top-k of the queries over one committed fragment's codes, as global positions;
    only over the rows whose global positions `allowed` lists (sorted), when given."""
    fragment_id, row_offset = item
    codec = load_codec(job.codec)
    ds = open_lance(job.table_uri, job.version)
    codes = codes_as_numpy(ds.get_fragment(fragment_id).to_table(columns=[CODE_COLUMN]).column(0))
    topk = TopK(queries.shape[0], job.k, exclude=query_positions)
    local = None
    if allowed is not None:
        local = allowed[(allowed >= row_offset) & (allowed < row_offset + len(codes))] - row_offset
        codes = codes[local]
    if len(codes) == 0:
        return topk.D, topk.I
    # one extra result per query so that excluding the query's own row still leaves k
    D, I = codec.search_codes(queries, codes, min(job.k + 1, codes.shape[0]))
    if local is not None:
        I = np.where(I >= 0, local[np.maximum(I, 0)], -1)
    topk.add(D, I, offset=row_offset)
    return topk.D, topk.I


def evaluate_version(out: str, table: str, version: int | str | None, executor: Executor, *, k: int | None = None,
                     rerank: bool = True, recompute: bool = False, served_grid: bool = True) -> dict:
    """Recall of search over the version's codes against the exact neighbours recorded for its
    held-out queries (and after exact re-ranking of r x k candidates), and the codec's relative
    reconstruction error. Everything here is in table rows: the recorded neighbours are, and
    the queries' own positions and the re-rank's source reads go through the version's RowMap.

    A run searches the queries over the codes while it holds them: new shards in the encode
    pass (ComputeSpec.search), kept shards of an incremental run in the read that finds
    their exact neighbours (s06_encode.search_kept_shard). It records the results in the manifest.
    Those are used unless `recompute`, or a different k, asks for a search over the stored
    codes (one read of every fragment's codes, and of the re-rank candidates' source rows)."""
    ds = require_dataset(out, table, version)
    manifest = version_manifest(ds)
    base = storage.normalize(out)
    codec_ref = manifest_codec(out, manifest["codec"])
    sample = manifest["sample"]
    xq = _load(base, sample["queries_uri"])
    rows = RowMap.of_manifest(out, manifest)
    qpos = rows.rows_of(_load(base, sample["query_positions_uri"]))  # the queries' own table rows (-1: dropped)
    truth = _load(base, sample["ground_truth_uri"])
    if k is not None and not 1 <= k <= truth.shape[1]:
        raise ConfigError(f"k must be from 1 to {truth.shape[1]} (the neighbours version {version}'s run recorded, "
                          f"its --eval-k), got {k}")
    k = k or truth.shape[1]
    codec = load_codec(codec_ref)
    xp = prepare_vectors(xq, codec.metric)
    if manifest.get("serve") == "lancedb":  # LanceDB's own search over the version's index
        served = evaluate_served(out, table, version_ref(ds, version), manifest, xq, qpos, truth[:, :k],
                                 grid=served_grid)
        return {"num_queries": int(len(xq)), "k": k, "exclude_self": True,
                **{f"recall_at_{kk}": served["defaults"][f"recall_at_{kk}"] for kk in (1, 10, 100)},
                "rerank_from": None, "searched": "lancedb",
                "relative_error": relative_error(xp, codec.decode(codec.encode(xq))), "served": served}
    warm = manifest_codec(out, manifest.get("rerank_codec"))
    if not recompute and k == truth.shape[1]:
        found = in_pass_evaluation(out, manifest, ds.count_rows(), rerank=rerank)
        if found is not None:
            return {**found, "partitions": manifest.get("partitions") and {
                key: manifest["partitions"][key] for key in ("nlist", "default_nprobes", "tolerance", "grid")}}
    job = CodeSearch(table_uri=table_uri(out, table), version=version_ref(ds, version), codec=codec_ref, k=k)
    items = [(fid, off) for fid, off, _ in fragment_offsets(ds)]
    found = TopK(len(qpos), k, exclude=qpos)
    for _, (D, I) in executor.imap(search_fragment, items, desc="evaluate",
                                   shared={"job": job, "queries": xq, "query_positions": qpos}):
        found.add(D, I)
    E, rerank_from = None, None
    if rerank:
        if warm is not None:
            E, rerank_from = column_distances(ds, warm, xp, found.I, codec.metric), "column"
        else:
            plan = SourcePlan.from_dict(json.loads(read_run_file(out, manifest["source"]["plan_uri"],
                                                                 needed_for="re-ranking from the source")))
            E = source_distances(plan, xp, rows.positions_of(found.I), codec.metric, executor)
            rerank_from = "source"
    record = evaluation(truth, found.I, E, num_rows=ds.count_rows(), rerank_from=rerank_from, codec=codec, xq=xq,
                        xp=xp, searched="stored codes")
    lists = version_lists(out, manifest)
    if lists is not None:  # the search over the partitions, against this search over every code
        measured = measure_nprobes(lists, codec, xq, qpos, truth[:, :k], ds.count_rows(), record)
        record["partitions"] = {key: measured[key] for key in ("nlist", "default_nprobes", "tolerance", "grid")}
    return record


def in_pass_evaluation(out: str, manifest: dict, num_rows: int, *, rerank: bool) -> dict | None:
    """The evaluation of a codes table's version from its run's search in the encode pass
    (`manifest` need not be committed yet: a run gates its version with it before the commit),
    or None when that pass did not search (a LanceDB-served table, checkpoints of an older run)."""
    sample = manifest["sample"]
    if manifest.get("serve") == "lancedb" or not sample.get("search_ids_uri") or \
            (rerank and not sample.get("search_exact_uri")):
        return None
    base = storage.normalize(out)
    codec = load_codec(manifest_codec(out, manifest["codec"]))
    xq = _load(base, sample["queries_uri"])
    truth = _load(base, sample["ground_truth_uri"])
    I = _load(base, sample["search_ids_uri"])
    E = _load(base, sample["search_exact_uri"]) if rerank else None
    warm = manifest.get("rerank_codec")
    return evaluation(truth, I, E, num_rows=num_rows, rerank_from=rerank and ("column" if warm else "source"),
                      codec=codec, xq=xq, xp=prepare_vectors(xq, codec.metric), searched="encode pass")


def _load(base: str, rel: str) -> np.ndarray:
    """An array of a run's folder; a one-line error when the folder was removed."""
    uri = storage.join(base, rel)
    if not storage.exists(uri):
        raise VecpressError(f"{uri} is missing (its run folder was removed?): the evaluation needs it; run "
                            "`vecpress compress --mode full` to rebuild the table with fresh held-out queries")
    return load_array(uri)


def evaluation(truth: np.ndarray, I: np.ndarray, E: np.ndarray | None, *, num_rows: int, rerank_from: str | None,
               codec, xq: np.ndarray, xp: np.ndarray, searched: str) -> dict:
    """The evaluation record of a version: recall (and re-ranked recall) of the search results I
    against the exact neighbours, and the codec's relative error on the held-out queries (raw
    `xq`, prepared for the metric `xp`)."""
    return {
        "num_queries": int(len(I)), "k": int(I.shape[1]), "exclude_self": True,
        **recall_table(truth, I, num_rows, E), "rerank_from": rerank_from or None,
        "searched": searched,
        "relative_error": relative_error(xp, codec.decode(codec.encode(xq))),
    }

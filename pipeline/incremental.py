"""Nightly recompression: what changed since the last version, whether the codec drifted,
whether a new version may be tagged `production`, and which old versions to drop.

A version's layout is a SourcePlan whose shards are in *dataset order* (row_offset = position
in the dataset), each shard owning the consecutive fragments it was written to. An
incremental run keeps the fragments of shards whose files are all unchanged as they are (no
rewrite), drops those of deleted or rewritten files, encodes new and rewritten files (and the
unchanged rows of shards it cannot keep whole, and of small kept shards, so that fragments
stay about `shard_rows` large), and commits the result in one Overwrite transaction that
reuses the kept data files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.knn import TopK, exact_knn, prepare_vectors
from vecpress.kernels.metrics import knn_recall, relative_error
from vecpress.pipeline import storage
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.lance_io import PRODUCTION_TAG, open_dataset, table_uri, version_manifest
from vecpress.pipeline.layout import Shard, SourcePlan, pack_shards, shared_shard

log = logging.getLogger("vecpress")


@dataclass(frozen=True)
class SourceDiff:
    """The current source snapshot against the layout of the table's latest version."""

    previous_version: int
    previous_manifest: dict
    files_added: list[str]
    files_removed: list[str]
    files_rewritten: list[str]
    files_unchanged: list[str]
    kept_shards: list[Shard]
    kept_fragments: list[dict]
    #: what the run encodes: the rows of new and rewritten files, and the unchanged rows of
    #: shards that cannot be kept whole (a file of theirs changed, or they are small: compaction)
    new_shards: list[Shard]
    #: rows of deleted and rewritten files in the previous version
    rows_removed: int
    #: ids (in the previous version) of the fragments each kept shard owns, parallel to kept_shards
    kept_fragment_ids: list[list[int]] = field(default_factory=list)
    #: the version no longer has vecpress's fragment layout (compacted, rows deleted): the
    #: diff only says whether the sources changed; it has no kept shards to extend
    layout_lost: bool = False
    #: rows of new and rewritten files (the rest of new_shards is unchanged rows encoded again)
    rows_added: int = 0

    @property
    def no_change(self) -> bool:
        return not (self.files_added or self.files_removed or self.files_rewritten)

    def summary(self) -> dict:
        return {"previous_version": self.previous_version, "files_added": len(self.files_added),
                "files_removed": len(self.files_removed), "files_rewritten": len(self.files_rewritten),
                "files_unchanged": len(self.files_unchanged), "rows_removed": self.rows_removed,
                "rows_added": self.rows_added,
                "rows_reencoded": sum(s.num_rows for s in self.new_shards) - self.rows_added}


def previous_layout(out: str, manifest: dict) -> SourcePlan:
    return SourcePlan.from_dict(json.loads(storage.read_bytes(
        storage.join(storage.normalize(out), manifest["source"]["plan_uri"]))))


#: with codec="auto", the options that decide which codec the advisor picks
ADVICE_OPTIONS = ("max_bytes", "min_recall", "advise_rerank", "advise_codecs")


def incremental_blockers(manifest: dict, plan: SourcePlan, metric: str, codec: str | None, *,
                         rerank_codec: str | None = None, advice: dict | None = None,
                         serving: dict | None = None) -> list[str]:
    """Why the previous version cannot be extended (empty when it can). `codec` None is
    codec="auto": then `advice` (ADVICE_OPTIONS) must equal the previous run's, or the advisor
    could pick another codec; the warm column's codec must be `rerank_codec` either way."""
    src = manifest["source"]
    why = []
    for what, old, new in [("vector column", src["vector_column"], plan.vector_column),
                           ("id column", src["id_column"], plan.id_column),
                           ("passthrough columns", list(src["keep"]), list(plan.keep)),
                           ("vector type", src["vector_type"], plan.vector_type), ("metric", manifest["metric"], metric)]:
        if old != new:
            why.append(f"{what} changed ({old} -> {new})")
    dropped = (manifest.get("id_check") or {}).get("rows_dropped")
    if dropped:  # (its layout counts source positions; its fragments hold fewer rows: pipeline.rowmap)
        why.append(f"it dropped {dropped} rows of duplicated ids (--duplicate-ids): its rows are decided again")
    if codec not in (None, manifest["codec"]["spec"]):
        why.append(f"codec changed ({manifest['codec']['spec']} -> {codec})")
    for name, default in (("serve", "codes"), ("vector_dtype", "float16")):
        old, new = (manifest.get("options") or {}).get(name, default), (serving or {}).get(name, default)
        if old != new and (name == "serve" or (serving or {}).get("serve") == "lancedb"):
            why.append(f"{name} changed ({old} -> {new})")
    old_warm = (manifest.get("rerank_codec") or {}).get("spec")
    if old_warm != rerank_codec:
        why.append(f"re-rank codec changed ({old_warm} -> {rerank_codec})")
    old_opts = manifest.get("options") or {}
    as_json = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 (the manifest holds JSON lists)
    for name, new in (advice or {}).items():
        if as_json(old_opts.get(name)) != as_json(new):
            why.append(f"codec=auto's {name} changed ({old_opts.get(name)} -> {new})")
    return why


def diff_sources(out: str, table: str, plan: SourcePlan, *, metric: str, codec: str | None,
                 rerank_codec: str | None = None, advice: dict | None = None,
                 serving: dict | None = None) -> SourceDiff | None:
    """None when there is no previous vecpress version to extend, or it cannot be extended
    (other columns, metric, codec or its choice, warm column: incremental_blockers): then the
    run is a full build."""
    ds = open_dataset(out, table)
    if ds is None:
        return None
    try:
        manifest = version_manifest(ds)
    except VecpressError:
        return None
    blockers = incremental_blockers(manifest, plan, metric, codec, rerank_codec=rerank_codec, advice=advice,
                                    serving=serving)
    if blockers:
        log.info("incremental: full rebuild instead: %s", "; ".join(blockers))
        return None
    plan_uri = storage.join(storage.normalize(out), manifest["source"]["plan_uri"])
    if not storage.exists(plan_uri):
        log.warning("incremental: full rebuild instead: %s version %d's layout %s is gone (its run folder was "
                    "removed)", table_uri(out, table), ds.version, plan_uri)
        return None
    prev = previous_layout(out, manifest)
    old = {f.uri: f for f in prev.files}
    new = {f.uri: f for f in plan.files}
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    both = set(new) & set(old)
    rewritten = sorted(u for u in both if new[u].changed_since(old[u]))
    unchanged = sorted(both - set(rewritten))
    same = set(unchanged)
    # each shard of the layout owns the next fragments, by row count; a shard is kept whole
    # when all its files are unchanged, else its unchanged rows are encoded again
    frags = ds.get_fragments()
    kept, runs, fi = [], [], 0
    matched = True
    for shard in prev.shards:
        owned, rows = [], 0
        while rows < shard.num_rows and fi < len(frags):
            owned.append(frags[fi])
            rows += frags[fi].count_rows()
            fi += 1
        if rows != shard.num_rows:
            matched = False
            break
        if all(p.file_uri in same for p in shard.pieces):
            kept.append((shard, owned))
        else:
            runs += [(new[p.file_uri], p.row_group_start, p.row_group_stop) for p in shard.pieces if p.file_uri in same]
    changed = set(added) | set(rewritten)
    if not matched or fi != len(frags):
        # compacted (LanceDB optimize), or rows deleted or added since vecpress wrote it: which
        # rows came from which file is lost. Unchanged sources still need nothing; otherwise the
        # run rebuilds (and lays the shards out again)
        if not changed and not removed:
            return SourceDiff(ds.version, manifest, [], [], [], unchanged, [], [], [], 0, layout_lost=True)
        log.warning("incremental: full rebuild instead: %s version %d no longer has the fragment layout "
                    "vecpress wrote (compacted, or rows deleted?)", table_uri(out, table), ds.version)
        return None
    if changed or runs:  # compaction: small kept shards of small files are packed again with what is encoded
        small = [(shard, owned) for shard, owned in kept
                 if shard.num_rows < plan.shard_rows // 2 and shared_shard(shard, new, plan.shard_rows)]
        kept = [k for k in kept if k not in small]
        runs += [(new[p.file_uri], p.row_group_start, p.row_group_stop) for shard, _ in small for p in shard.pieces]
    runs += [(new[u], 0, len(new[u].row_group_rows)) for u in sorted(changed)]
    runs.sort(key=lambda r: (r[0].uri, r[1]))
    return SourceDiff(ds.version, manifest, added, removed, rewritten, unchanged,
                      kept_shards=[shard for shard, _ in kept],
                      kept_fragments=[f.metadata.to_json() for _, owned in kept for f in owned],
                      new_shards=pack_shards(runs, plan.shard_rows),
                      rows_removed=sum(old[u].num_rows for u in [*removed, *rewritten]),
                      kept_fragment_ids=[[f.fragment_id for f in owned] for _, owned in kept],
                      rows_added=sum(new[u].num_rows for u in changed))


def layout_after(plan: SourcePlan, diff: SourceDiff) -> SourcePlan:
    """The new version's layout: kept shards in their old order, then the new shards."""
    shards, offset = [], 0
    for s in [*diff.kept_shards, *diff.new_shards]:
        shards.append(dataclasses.replace(s, index=len(shards), row_offset=offset))
        offset += s.num_rows
    return dataclasses.replace(plan, shards=tuple(shards), num_rows=offset)


# ---- drift ------------------------------------------------------------------------------------

def probe_quality(codec: Codec, x: np.ndarray) -> dict:
    """How well a codec fits a uniform sample x it was not trained on: relative reconstruction
    error over x, and recall@10 of ADC search for a tenth of x (queries) among all of x."""
    xp = prepare_vectors(x, codec.metric)
    nq = max(1, min(200, len(x) // 10))
    k = min(10, len(x) - 1)
    exclude = np.arange(nq)
    truth, found = TopK(nq, k, exclude), TopK(nq, k, exclude)
    truth.add(*exact_knn(xp[:nq], xp, k + 1, codec.metric))
    found.add(*codec.search_codes(x[:nq], codec.encode(x), k + 1))
    return {"num_vectors": int(len(x)), "relative_error": relative_error(xp, codec.decode(codec.encode(x))),
            "recall_at_10": knn_recall(truth.I, found.I, k)}


def drift_decision(baseline: dict | None, current: dict, *, threshold: float, force: bool) -> dict:
    """Retrain when forced, or when the reconstruction error on fresh data grew by more than
    `threshold` (relative) over the error measured when the codec was trained."""
    d = {"measured": True, "relative_error": current["relative_error"], "recall_at_10": current["recall_at_10"],
         "baseline_relative_error": None if baseline is None else baseline["relative_error"],
         "baseline_recall_at_10": None if baseline is None else baseline["recall_at_10"], "threshold": threshold}
    if force:
        return {**d, "retrain": True, "reason": "retraining forced"}
    if baseline is None:
        return {**d, "retrain": True, "reason": "no baseline recorded for the codec"}
    growth = current["relative_error"] / max(baseline["relative_error"], 1e-12) - 1
    d["error_growth"] = growth
    if growth > threshold:
        return {**d, "retrain": True, "reason": f"reconstruction error grew {growth:+.1%} (> {threshold:.0%}) "
                                                "since the codec was trained"}
    return {**d, "retrain": False, "reason": f"error {growth:+.1%} vs training (threshold {threshold:.0%}): codec kept"}


# ---- quality gate and retention -----------------------------------------------------------------

def gate_decision(out: str, table: str, recall_at_10: float | None, *, floor: float | None, max_drop: float,
                  tag: str = PRODUCTION_TAG, load_eval=None) -> dict:
    """Whether a version with this recall@10 may take `tag`: it reaches `floor` and is at most
    `max_drop` below the currently tagged version's. A version whose recall@10 was not measured
    passes only where neither check applies. Decides only (a codes table's run decides before
    its commit, from the encode pass's search: pipeline.gated)."""
    ds = open_dataset(out, table)
    tags = ds.tags.list() if ds is not None else {}
    previous = tags[tag]["version"] if tag in tags else None
    prev_recall = None
    if previous is not None and load_eval is not None:
        prev_recall = (load_eval(out, table, previous) or {}).get("recall_at_10")
    d = {"tag": tag, "recall_at_10": recall_at_10, "floor": floor, "max_drop": max_drop,
         "previous_version": previous, "previous_recall_at_10": prev_recall}
    problems = []
    if recall_at_10 is None:
        # (--eval-k below 10, or a corpus of 10 rows or fewer): only a check that applies fails
        if floor is not None:
            problems.append(f"recall@10 was not measured (--eval-k below 10?), the floor is {floor:.4f}")
        if prev_recall is not None:
            problems.append(f"recall@10 was not measured, version {previous} had {prev_recall:.4f}")
    else:
        if floor is not None and recall_at_10 < floor:
            problems.append(f"recall@10 {recall_at_10:.4f} is below the floor {floor:.4f}")
        if prev_recall is not None and recall_at_10 < prev_recall - max_drop:
            problems.append(f"recall@10 {recall_at_10:.4f} is more than {max_drop:.4f} below version {previous}'s "
                            f"{prev_recall:.4f}")
    if problems:
        return {**d, "passed": False, "tagged_version": previous,
                "reason": "; ".join(problems) + f": '{tag}' stays on version {previous}"}
    return {**d, "passed": True, "tagged_version": None, "reason": ""}


def gate_version(out: str, table: str, version: int, recall_at_10: float | None, *, floor: float | None,
                 max_drop: float, tag: str = PRODUCTION_TAG, load_eval=None, decided: dict | None = None) -> dict:
    """Move `tag` to `version` if it passes (gate_decision, or the decision `decided` already
    made before the commit); otherwise leave the tag where it is."""
    d = decided or gate_decision(out, table, recall_at_10, floor=floor, max_drop=max_drop, tag=tag,
                                 load_eval=load_eval)
    if not d["passed"]:
        return d
    ds = open_dataset(out, table)
    tags = ds.tags.list()
    if tag not in tags:
        ds.tags.create(tag, version)
    elif tags[tag]["version"] != version:
        ds.tags.update(tag, version)
    return {**d, "tagged_version": version, "reason": f"'{tag}' now on version {version}"}


def apply_retention(out: str, table: str, keep_versions: int) -> dict:
    """Drop versions beyond the newest `keep_versions`; tagged versions are never removed."""
    ds = open_dataset(out, table)
    if ds is None or keep_versions <= 0:
        return {}
    stats = ds.cleanup_old_versions(retain_versions=keep_versions, error_if_tagged_old_versions=False)
    return {"bytes_removed": int(getattr(stats, "bytes_removed", 0)),
            "old_versions_removed": int(getattr(stats, "old_versions", 0))}

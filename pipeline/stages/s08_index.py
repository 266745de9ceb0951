"""Stage 8 with `--serve lancedb`, index and gate: the candidate's vector index (IVF_PQ, ...), one
segment per encode task built in parallel from the partitions and codes the encode pass computed,
committed together as one new detached version (pipeline.served); then LanceDB's search of it
at its defaults decides the quality gate, and the candidate becomes main's latest version or
goes to its branch `failed-<run id>` (pipeline.gated). A codes table has nothing to index (its
run gated before its commit)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from vecpress.kernels.codecs.ivf import parse_served_spec
from vecpress.pipeline import storage
from vecpress.pipeline.context import RunContext, manifest_codec
from vecpress.pipeline.evaluate import evaluate_version
from vecpress.pipeline.executor import Executor, collect
from vecpress.pipeline.gated import commit_failed_candidate, promote, settled
from vecpress.pipeline.incremental import gate_decision
from vecpress.pipeline.locking import check_lease
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.report import load_eval
from vecpress.pipeline.served import IndexJob, build_index_segment, commit_index
from vecpress.pipeline.stages.s06_encode import Encoded
from vecpress.pipeline.stages.s07_commit import Committed

log = logging.getLogger("vecpress")


def index(ctx: RunContext, committed: Committed, encoded: Encoded, opts: CompressOptions,
          executor: Executor) -> Committed:
    """--serve lancedb: index the candidate (a new detached version, whose index covers all its
    rows), gate it by LanceDB's search at its defaults, and promote it (main's latest) or file
    it (tag failed-<run id>); as it is otherwise. A retry after the gate's promotion or filing
    finds it done (and measures it again for the decision)."""
    if opts.serve != "lancedb":
        return committed
    start = time.perf_counter()
    column = committed.manifest["source"]["vector_column"]
    done = settled(ctx.out, ctx.table, ctx.run_id)
    if done is None:
        job = IndexJob(ctx.table_uri, committed.version, column, manifest_codec(ctx.out, committed.manifest["codec"]),
                       opts.vector_dtype)
        segments = collect(executor.imap(build_index_segment, list(encoded.index_buffers), desc="index",
                                         shared={"job": job}))
        candidate = commit_index(ctx.table_uri, committed.version, segments)
    quick = evaluate_version(ctx.out, ctx.table, candidate if done is None else (done[1] or done[0]), executor,
                             rerank=False, served_grid=False)
    decided = gate_decision(ctx.out, ctx.table, quick.get("recall_at_10"), floor=opts.gate_min_recall,
                            max_drop=opts.gate_max_drop, load_eval=load_eval)
    if done is None:
        if ctx.lease is not None:
            check_lease(ctx.lease)
        if decided["passed"]:
            done = promote(ctx.out, ctx.table, candidate, run_id=ctx.run_id), None
        else:
            tag, version = commit_failed_candidate(ctx.out, ctx.table, candidate, run_id=ctx.run_id)
            done = version, tag
    version, ref = done
    if ref is not None:
        decided = {**decided, "failed_tag": ref}
    spec = committed.manifest["codec"]["spec"]
    manifest = {**committed.manifest, "version": version, **({"branch": ref} if ref else {}),
                "index": {"type": parse_served_spec(spec, committed.manifest["dim"]).index_type,
                          "name": f"{column}_idx", "column": column, "spec": spec,
                          "segments": len(encoded.index_buffers)}}
    storage.write_bytes(ctx.run_file("manifest.json"), json.dumps(manifest, indent=1).encode())
    storage.remove_tree(ctx.run_file("index-buffers"))  # (the encode pass's codes: in the index now)
    log.info("index: %s over %s, %d segments; %s", spec, column, len(encoded.index_buffers),
             f"version {version} of branch {ref} (failed the gate)" if ref else f"the table's version {version}")
    return dataclasses.replace(committed, version=version, manifest=manifest, seconds=time.perf_counter() - start,
                               gate=decided, ref=ref)


"""Stage 8 with `--serve lancedb`, index: the committed version's vector index (IVF_PQ, ...), one segment per
encode task built in parallel from the partitions and codes the encode pass computed, committed
together as one new version (pipeline.served). A codes table has nothing to index."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from vecpress.kernels.codecs.ivf import parse_served_spec
from vecpress.pipeline import storage
from vecpress.pipeline.context import RunContext, manifest_codec
from vecpress.pipeline.executor import Executor, collect
from vecpress.pipeline.locking import check_lease
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.served import IndexJob, build_index_segment, commit_index, indexed_version
from vecpress.pipeline.stages.s06_encode import Encoded
from vecpress.pipeline.stages.s07_commit import Committed

log = logging.getLogger("vecpress")


def index(ctx: RunContext, committed: Committed, encoded: Encoded, opts: CompressOptions,
          executor: Executor) -> Committed:
    """--serve lancedb: index the committed version (a new version, whose index covers all its
    rows); as it is otherwise. A retry after the index commit finds it done."""
    if opts.serve != "lancedb":
        return committed
    start = time.perf_counter()
    column = committed.manifest["source"]["vector_column"]
    done = indexed_version(ctx.table_uri, column)
    if done is None or done <= committed.version:
        job = IndexJob(ctx.table_uri, committed.version, column, manifest_codec(ctx.out, committed.manifest["codec"]),
                       opts.vector_dtype)
        segments = collect(executor.imap(build_index_segment, list(encoded.index_buffers), desc="index",
                                         shared={"job": job}))
        if ctx.lease is not None:
            check_lease(ctx.lease)
        done = commit_index(ctx.table_uri, committed.version, column, segments)
    spec = committed.manifest["codec"]["spec"]
    manifest = {**committed.manifest, "version": done,
                "index": {"type": parse_served_spec(spec, committed.manifest["dim"]).index_type,
                          "name": f"{column}_idx", "column": column, "spec": spec, "data_version": committed.version,
                          "segments": len(encoded.index_buffers)}}
    storage.write_bytes(ctx.run_file("manifest.json"), json.dumps(manifest, indent=1).encode())
    storage.remove_tree(ctx.run_file("index-buffers"))  # (the encode pass's codes: in the index now)
    log.info("index: %s over %s, %d segments, version %d", committed.manifest["codec"]["spec"], column,
             len(encoded.index_buffers), done)
    return dataclasses.replace(committed, version=done, manifest=manifest, seconds=time.perf_counter() - start)

"""Stage 5, train: the codec (and the warm column's codec), or with `--serve lancedb` the
index's model (IVF centroids, PQ codebook), on the sample, stored under its content hash; an
incremental run carries the previous version's instead. A partitioned codes table also gets
its coarse partitions and, where they rank the sample's neighbours better than the table's
codes (lists.judge_residual), a codec of the rows' residuals for its lists."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.codecs.ivf import IvfModel
from vecpress.kernels.codecs.nested import first_half, residual_prefix
from vecpress.pipeline.codec_store import CodecRef, load_codec, save_codec
from vecpress.pipeline.errors import ConfigError
from vecpress.pipeline.context import RunContext, load_array, manifest_codec
from vecpress.pipeline.heartbeat import train_logged
from vecpress.pipeline.incremental import probe_quality
from vecpress.pipeline.lists import auto_partitions, coarse_spec, judge_residual, residual_fits, residual_leads, \
    residual_metric
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.stages.s01_plan import Planned
from vecpress.pipeline.stages.s03_sample import Sampled
from vecpress.pipeline.stages.s04_advise import Advised

log = logging.getLogger("vecpress")

#: sample rows the train stage judges residual codes against the table's on (lists.judge_residual)
JUDGE_ROWS = 20_000


@dataclass(frozen=True)
class Trained:
    codec: CodecRef
    rerank_codec: CodecRef | None = None
    seconds: float = 0.0
    #: the codec's fit on held-out data when trained: the reference for drift checks
    baseline: dict | None = None
    #: a codes table's coarse quantizer (pipeline.lists: IVF centroids), or None without partitions
    coarse: CodecRef | None = None
    #: the codec of the rows' residuals to their centroids, which the inverted lists hold (None:
    #: the lists hold the table's codes)
    residual: CodecRef | None = None
    #: how residual codes and the table's ranked the sample's neighbours (lists.judge_residual),
    #: where residual codes were trained: the manifest's partitions.residual_judged
    residual_judged: dict | None = None


def train(ctx: RunContext, advised: Advised, sampled: Sampled, opts: CompressOptions) -> Trained:
    """Train the codec on the sample and store it content-addressed."""
    start = time.perf_counter()
    spec = advised.planned.codec_spec
    xt = load_array(sampled.train_uri)
    if advised.pretrained is not None and advised.pretrained.spec == spec:
        ref = advised.pretrained  # trained by the advisor's sweep on this same sample and seed
    else:
        kind = IvfModel if opts.serve == "lancedb" else Codec  # the served index's model, or a codec
        ref = save_codec(_train(kind, xt, spec, opts.metric, opts), ctx.sidecar)
    warm = None
    if opts.rerank_codec:
        warm = save_codec(_train(Codec, xt, opts.rerank_codec, opts.metric, opts, "the warm column's "), ctx.sidecar)
    coarse = residual = judged = None
    xq = load_array(sampled.queries_uri)
    nlist = num_partitions(opts, advised.planned.plan.num_rows, len(xt))
    if nlist:  # trained with the codec, on the same sample
        model = _train(IvfModel, xt, coarse_spec(nlist), opts.metric, opts, "the partitions' ")
        coarse = save_codec(model, ctx.sidecar)
        if opts.residual and residual_fits(ref.spec, model.dim):
            codec, judged = _residual_codec(load_codec(ref), model, xt, xq, opts)
            residual = None if codec is None else save_codec(codec, ctx.sidecar)
    baseline = probe_quality(load_codec(ref), xq)  # held out: never trained on
    log.info("train: %s%s on %d vectors in %.1fs -> %s", ref.spec, f" with {nlist} partitions" +
             (" (residual codes)" if residual else "") if nlist else "", xt.shape[0], time.perf_counter() - start,
             ref.uri)
    return Trained(ref, warm, time.perf_counter() - start, baseline, coarse, residual, judged)


def _residual_codec(table: Codec, model: IvfModel, xt, xq, opts: CompressOptions) -> tuple[Codec | None, dict]:
    """The codec of the sample's residuals to their partitions' centroids that the lists hold,
    or None where it ranks the sample's neighbours no better than the table's codes
    (lists.judge_residual); and that judgement. A residual quantizer is judged by its first
    half first (nested.first_half: trained on the residuals, the table codec's cut): residual
    codes gain the most at few stages and less with each stage (BENCHMARKS.md, "Residual
    quantizers' lists: judged by their first half"), so where that half does not lead, the
    rest is not trained; where it leads, the rest trains on from it."""
    part = model.assign(xt)[0]
    r = model.residuals(xt, part)
    judge = functools.partial(judge_residual, coarse=model, base=xt[-JUDGE_ROWS:], partitions=part[-JUDGE_ROWS:],
                              residuals=r[-JUDGE_ROWS:], xq=xq, metric=opts.metric)
    metric, half, start = residual_metric(opts.metric), first_half(table.spec, table.dim), None
    if half is not None:
        start = _train(Codec, r, half, metric, opts, "the residuals' ")
        judged = judge(residual_prefix(table, half), start)
        if not residual_leads(judged):
            _log_table_codes(f"{half}, the first half of {table.spec} (the rest not trained)", judged)
            return None, {**judged, "judged_by": half}
    codec = _train(Codec, r, table.spec, metric, opts, "the residuals' ", start=start)
    judged = judge(table, codec)
    if residual_leads(judged):
        return codec, judged
    _log_table_codes(table.spec, judged)
    return None, judged


def _log_table_codes(what: str, judged: dict) -> None:
    log.info("train: %s codes of residuals rank the sample's neighbours no better than the table's codes "
             "(recall@10 %.3f against %.3f): the lists hold the table's codes", what,
             judged["residual_codes_recall_at_10"], judged["table_codes_recall_at_10"])


def _train(kind, xt, spec: str, metric: str, opts: CompressOptions, what: str = "", **train):
    return train_logged(kind, xt, spec, metric, seed=opts.seed, ngpu=opts.ngpu, what=f"train: {what}", **train)


def num_partitions(opts: CompressOptions, num_rows: int, num_train: int) -> int:
    """A codes table's coarse partitions: --partitions, or by default (auto) lists.auto_partitions;
    none for a LanceDB-served table (its index has its own)."""
    if opts.serve != "codes":
        return 0
    if opts.partitions is None:
        return auto_partitions(num_rows, num_train)
    if opts.partitions > num_train:
        raise ConfigError(f"--partitions {opts.partitions} needs at least as many training vectors, and the sample "
                          f"holds {num_train} (of {num_rows} rows): fewer partitions, or a larger --num-train")
    return opts.partitions


def carried_codec(ctx: RunContext, planned: Planned) -> Trained:
    """An incremental run keeps the previous version's codec (and warm codec) as they are."""
    prev = planned.diff.previous_manifest
    return Trained(manifest_codec(ctx.out, prev["codec"]), manifest_codec(ctx.out, prev.get("rerank_codec")),
                   baseline=prev.get("drift_baseline"),
                   coarse=manifest_codec(ctx.out, (prev.get("partitions") or {}).get("coarse")),
                   residual=manifest_codec(ctx.out, (prev.get("partitions") or {}).get("residual")))

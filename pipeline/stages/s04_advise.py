"""Stage 4 with `--codec auto`, advise: sweep the candidate codecs (with `--serve lancedb`, the
index forms IVF<n>,PQ<m>, judged by their search over every partition) on this run's own
sample and choose one (the sweep's reports go into the run's folder, its decision into the
manifest)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from vecpress.kernels.codecs.grid import held_by_finer
from vecpress.pipeline.codec_store import CodecRef, save_codec
from vecpress.pipeline.context import RunContext, load_array
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.preselect import SECOND_STAGE_ROWS, preselect, second_stage_rows, settled_at_half
from vecpress.pipeline.stages.s01_plan import Planned, resolve_codec
from vecpress.pipeline.stages.s03_sample import Sampled
from vecpress.pipeline.sweep import candidate_specs, choose, codec_kind, run_sweep, score
from vecpress.pipeline.sweep_report import write_reports

log = logging.getLogger("vecpress")


@dataclass(frozen=True)
class Advised:
    #: the plan with its codec chosen (as given when it was not "auto")
    planned: Planned
    #: codec="auto": the advisor's decision and the sweep table behind it (manifest `advisor`)
    advisor: dict | None = None
    #: codec="auto": the chosen codec as the sweep trained it (same sample and seed)
    pretrained: CodecRef | None = None
    seconds: float = 0.0


def advise(ctx: RunContext, planned: Planned, sampled: Sampled, opts: CompressOptions,
           executor: Executor) -> Advised:
    """codec="auto": sweep the candidates on this run's own sample and choose (as given
    otherwise)."""
    if planned.codec_spec is not None:
        return Advised(planned)
    start = time.perf_counter()
    plan = planned.plan
    budgets = [opts.max_bytes] if opts.max_bytes else None
    specs = candidate_specs(plan.dim, opts.metric, planned.num_train,
                            codecs=list(opts.advise_codecs or []) or None, budgets=budgets,
                            served_rows=plan.num_rows if opts.serve == "lancedb" else None)
    xt, xq = load_array(sampled.train_uri), load_array(sampled.queries_uri)
    staged, held, first = None, {}, {}
    if not opts.advise_codecs and opts.serve == "codes":  # (a list given is swept as it is)
        if opts.max_bytes:  # (the best within the budget: a finer one of the same family that fits is better)
            held = held_by_finer(specs)
            specs = [s for s in specs if s not in held]
            if held:
                log.info("advise: %d candidates within %d B; not tried, a finer one of the family fits: %s",
                         len(specs), opts.max_bytes, ", ".join(f"{s} ({by})" for s, by in held.items()))
        specs, staged, first = preselect(specs, xt, xq, metric=opts.metric, seed=opts.seed, ngpu=opts.ngpu,
                                         max_bytes=opts.max_bytes, min_recall=opts.min_recall)
    if staged is not None and opts.max_bytes and opts.advise_rerank <= 1 and len(specs) == 1:
        return _first_stage_leader(planned, staged, held, opts, ctx, time.perf_counter() - start)
    # the second stage, judging by rank within --max-bytes: a bounded part of a larger corpus
    max_rows = SECOND_STAGE_ROWS if staged is not None and opts.max_bytes else None
    train_rows, as_trained = _second_stage_training(specs, staged, first, plan.dim, opts.metric, len(xt))
    log.info("advise: sweeping %d candidate codecs: %s", len(specs), ", ".join(
        s + (f" (trained on {train_rows[s]:,} of the sample's {len(xt):,} rows: no better on more)" if s in train_rows
             else f" (as the first stage trained it on {as_trained[s].train_rows:,} rows: no better on more)"
             if s in as_trained else "") for s in specs))
    # (--max-bytes judged without re-ranking: a front-runner ahead for good over the first half of the rows is the pick)
    enough = settled_at_half if max_rows and opts.advise_rerank <= 1 else None
    result = run_sweep(plan, xt, xq, load_array(sampled.query_positions_uri), specs, opts, executor=executor,
                       max_rows=max_rows, train_rows=train_rows, trained=as_trained, enough=enough)
    swept = f"{result.num_rows:,} of {result.corpus_rows:,} rows" if result.num_rows < plan.num_rows \
        else "the corpus"
    pick = choose(result.rows, max_bytes=opts.max_bytes, min_recall=opts.min_recall, rerank=opts.advise_rerank)
    reports = write_reports(result, ctx.run_file("sweep"), budgets)
    chosen = resolve_codec(ctx, planned, pick["codec"], opts)
    tc = next(c for c in result.trained if c.spec == pick["codec"])
    # (trained here on fewer rows than the sample's: the train stage trains it on them all, as for a named codec)
    pretrained = save_codec(codec_kind(tc.spec).from_bytes(tc.blob, spec=tc.spec, metric=opts.metric,
                                                           sha256=tc.sha256), ctx.sidecar) \
        if tc.train_rows in (None, len(xt)) else None
    fewer = {c.spec: c.train_rows for c in result.trained if c.train_rows not in (None, len(xt))}
    advisor = {
        "criterion": _criterion_of(opts), "chosen": pick["codec"],
        "chosen_recall_at_10": score(pick, opts.advise_rerank),
        "code_bytes": pick["code_bytes"], "table": result.rows, "failed": result.failed,
        # the first stage (pipeline.preselect): every candidate on a small sample, and the kept
        "first_stage": staged, "held_by_finer": held,
        "decided_in": "second stage" if staged else "sweep",
        "swept_rows": result.num_rows,
        # why the second stage's pass read only the first half of its rows (pipeline.preselect.settled_at_half)
        "stopped_at_half": result.stopped_at_half,
        # front-runners trained on fewer of the sample's rows (second_stage_rows), and whether the train stage
        # takes the pick as trained here (else it trains it on the whole sample)
        "trained_on_fewer_rows": fewer, "pick_trained_here": pretrained is not None,
        "reason": f"best recall@10 {_criterion(opts)} of {len(result.rows)} codecs swept over {swept}"
                  + (f" (the first stage's {len(staged['kept'])} front-runners" + (
                      f"; {_fewer_text(fewer, len(xt))}" if fewer else "") + ")" if staged else "")
                  + (f"; the pass ended at half its rows, settled: {result.stopped_at_half['reason']}"
                     if result.stopped_at_half else "")
                  + ("" if pretrained is not None else
                     f"; trained here on {tc.train_rows:,} rows, it is trained on the whole sample next"),
        "report_uri": ctx.relative(reports["md"]),
    }
    log.info("advise: chose %s (%d B, recall@10 %.3f%s)", pick["codec"], pick["code_bytes"],
             score(pick, opts.advise_rerank), f" after re-rank x{opts.advise_rerank}" if opts.advise_rerank > 1 else "")
    return Advised(chosen, advisor, pretrained, time.perf_counter() - start)


def _second_stage_training(specs: list[str], staged: dict | None, first: dict, dim: int, metric: str,
                           sample_rows: int) -> tuple[dict[str, int], dict]:
    """({front-runner: the rows the second stage trains it on, where fewer than the sample's},
    {front-runner: as the first stage trained it, where that serves}): preselect.second_stage_rows.
    Nothing without a first stage."""
    train_rows, as_trained = {}, {}
    for spec in specs if staged is not None else []:
        rows = second_stage_rows(spec, dim, metric, staged["train_rows"], sample_rows)
        if spec in first and rows == first[spec].train_rows:
            as_trained[spec] = first[spec]
        elif rows < sample_rows:
            train_rows[spec] = rows
    return train_rows, as_trained


def _fewer_text(fewer: dict[str, int], sample_rows: int) -> str:
    """Which front-runners the second stage trained on fewer rows than the sample's, as the reason says it."""
    return (", ".join(f"{s} on {n:,}" for s, n in fewer.items()) + f" of the sample's {sample_rows:,} rows: "
            "codecs of their kinds came out no better on more")


def _criterion_of(opts: CompressOptions) -> dict:
    """The advisor's criterion as the manifest keeps it."""
    return {"max_bytes": opts.max_bytes, "min_recall": opts.min_recall, "rerank": opts.advise_rerank}


def _criterion(opts: CompressOptions) -> str:
    if opts.max_bytes:
        return f"within {opts.max_bytes} B"
    return f"the fewest bytes reaching {opts.min_recall}" + (f" after re-rank x{opts.advise_rerank}"
                                                              if opts.advise_rerank > 1 else "")


def _first_stage_leader(planned: Planned, staged: dict, held: dict[str, str], opts: CompressOptions,
                        ctx: RunContext, seconds: float) -> Advised:
    """--max-bytes (judged without re-ranking), and one first-stage candidate ahead of the
    others for good (pipeline.preselect: by more than LEAD_MARGIN, or judged the more roughly
    and ahead by more than its noise): chosen there. The train stage trains it on the whole
    sample as it trains a codec named with --codec; the evaluate stage measures it over the
    corpus."""
    rows = {r["codec"]: r for r in staged["rows"] if "error" not in r}
    pick = rows[staged["kept"][0]]
    by = pick.get("judged_by")  # (its first stages led: the rest of it not trained here)
    heads = {pick["codec"], by} - {None}
    cut = [c for c, r in rows.items() if r.get("cut_from") in heads and c != by and r["code_bytes"] <= opts.max_bytes]
    led = (f"its first stages, {by}, led the first stage" if by else "led the first stage")
    reason = (f"{led} within {opts.max_bytes} B with recall@10 {pick['recall_at_10']:.3f}"
              + (f" ({', '.join(cut)}: its first stages)" if cut else "") + f" against {_lead_text(staged)}"
              + (": it holds them and more stages, so it is at least as good; chosen without training the rest of it "
                 "or a second stage" if by else ": chosen without a second stage"))
    log.info("advise: chose %s (%d B): %s", pick["codec"], pick["code_bytes"], reason)
    advisor = {
        "criterion": _criterion_of(opts), "chosen": pick["codec"], "chosen_recall_at_10": pick["recall_at_10"],
        "code_bytes": pick["code_bytes"], **({"recall_judged_by": by} if by else {}),
        "table": [], "failed": [r for r in staged["rows"] if "error" in r], "first_stage": staged,
        "held_by_finer": held, "decided_in": "first stage", "reason": reason, "report_uri": None,
    }
    return Advised(resolve_codec(ctx, planned, pick["codec"], opts), advisor, None, seconds)


def _lead_text(staged: dict) -> str:
    """The first-stage leader's lead over the best of the rest, as its reason says it."""
    lead = staged.get("lead")
    if lead is None:
        return "no other candidate"
    rival = f"{lead['over']} ({lead['recall_at_10']:.3f})"
    if lead["rule"] != "rougher":
        return f"{rival}, more than {staged['lead_margin']} ahead"
    ours, theirs = lead["rows_per_parameter"]
    return (f"{rival}, {lead['by']:.3f} ahead, {lead['standard_errors']:.1f} standard errors of the per-query "
            f"difference, trained on {ours:g} rows per parameter of its k-means (centroids x the dims each spans) "
            f"against {f'its {theirs:g}' if theirs else 'none (it fits no centroids)'}, so judged the more roughly "
            "of the two (such leads within 0.05 held at full size in 42 of 43 pairs measured, BENCHMARKS.md)")

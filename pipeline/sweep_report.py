"""`vecpress sweep` (sweep_corpus) and the sweep's reports: sweep.md (a table of every codec
swept), sweep.png (recall@10 against bytes, the Pareto front marked) and sweep.json (the whole
result), as `vecpress sweep` and the advisor write them."""

from __future__ import annotations

import json
import logging

import numpy as np

from vecpress.pipeline import storage
from vecpress.pipeline.errors import ConfigError
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.sweep import SweepResult, best_per_budget, candidate_specs, run_sweep

log = logging.getLogger("vecpress")


def _f(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def markdown_table(result: SweepResult, budgets: list[int] | None = None) -> str:
    lines = [
        f"Codec sweep: {result.num_rows:,} rows"
        + (f" (of {result.corpus_rows:,}, in stretches spread over the corpus)"
           if result.corpus_rows and result.corpus_rows > result.num_rows else "")
        + f" x {result.dim}-d ({result.source_bytes} B/vector), metric "
        f"{result.metric}, {result.num_train:,} training vectors, {result.num_queries} held-out queries, "
        f"seed {result.seed}.",
        "",
        "| codec | bytes | ratio | R@1 | R@10 | R@100 | R@10 rerank x2 | x4 | x10 | rel. error | train s "
        "| encode rows/s | Pareto |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in result.rows:
        rr = r.get("rerank") or {}
        lines.append(
            f"| `{r['codec']}` | {r['code_bytes']} | {result.source_bytes / r['code_bytes']:.0f}x "
            f"| {_f(r['recall_at_1'])} "
            f"| {_f(r['recall_at_10'])} | {_f(r['recall_at_100'])} | {_f(rr.get('2', {}).get('recall_at_10'))} "
            f"| {_f(rr.get('4', {}).get('recall_at_10'))} | {_f(rr.get('10', {}).get('recall_at_10'))} "
            f"| {r['relative_error']:.4f} | {r['train_seconds']:.1f} | {r['encode_rows_per_second'] or 0:,} "
            f"| {'★' if r['pareto'] else ''} |")
    for f in result.failed:
        lines.append(f"| `{f['codec']}` | failed: {f['error']} |||||||||||| ")
    if budgets:
        lines += ["", "Best recall@10 within each budget:", ""]
        for b, spec in best_per_budget(result.rows, budgets).items():
            lines.append(f"- {b} B: {'none fits' if spec is None else f'`{spec}`'}")
    return "\n".join(lines) + "\n"


def plot_png(result: SweepResult, uri: str) -> None:
    """recall@10 against bytes per vector (log scale), Pareto front marked; re-ranked x4 too."""
    import io

    import matplotlib.pyplot as plt

    fig, _ = sweep_figure(result)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


#: where a codec's label may go, in points from its marker, tried in this order (left of the
#: marker for a negative x: the label then ends there)
LABEL_OFFSETS = [(4, 4), (4, -11), (-4, 4), (-4, -11), (4, 13), (4, -20), (-4, 13), (-4, -20), (4, 22), (4, -29),
                 (-4, 22), (-4, -29), (4, 31), (4, -38), (-4, 31), (-4, -38)]


def sweep_figure(result: SweepResult):
    """The sweep's plot as a matplotlib figure and its codec labels (plot_png saves it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    xs = [r["code_bytes"] for r in rows]
    ys = [r["recall_at_10"] or 0 for r in rows]
    y4 = [(r.get("rerank") or {}).get("4", {}).get("recall_at_10") for r in rows]
    ax.scatter(xs, ys, color="#1f77b4", zorder=3, label="recall@10 (codes only)")
    if any(v is not None for v in y4):
        ax.scatter(xs, [v if v is not None else np.nan for v in y4], facecolors="none", edgecolors="#ff7f0e",
                   zorder=2, label="recall@10, exact re-rank of 4x10")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["code_bytes"])
    ax.plot([r["code_bytes"] for r in front], [r["recall_at_10"] for r in front], color="#d62728", lw=1.5,
            zorder=1, label="Pareto front")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per vector")
    ax.set_ylabel("recall@10 (k-recall@k, held-out queries)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"vecpress sweep: {result.num_rows:,} x {result.dim}-d, {result.metric}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()  # (before the labels: it moves the axes, and the labels are placed in pixels)
    return fig, _place_labels(fig, ax, [r["codec"] for r in rows], xs, ys)


def _place_labels(fig, ax, names: list[str], xs: list, ys: list) -> list:
    """Each name next to its marker, at the first of LABEL_OFFSETS where it overlaps no label
    placed before it (else where it overlaps least): codecs of the same size and similar recall
    wrote their names over each other. A label cut off by the figure's edge counts as overlapping."""
    renderer = fig.canvas.get_renderer()
    placed, labels = [], []
    for i in sorted(range(len(names)), key=lambda i: (xs[i], -ys[i])):
        best = None
        for dx, dy in LABEL_OFFSETS:
            label = ax.annotate(names[i], (xs[i], ys[i]), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                                ha="left" if dx >= 0 else "right")
            box = label.get_window_extent(renderer)
            overlap = sum(_common_area(box, b) for b in placed) + 10 * (_common_area(box, box) -
                                                                        _common_area(box, fig.bbox))  # (cut off)
            if best is None or overlap < best[0]:
                if best is not None:
                    best[1].remove()
                best = (overlap, label, box)
            else:
                label.remove()
            if overlap == 0:
                break
        placed.append(best[2])
        labels.append(best[1])
    return labels


def _common_area(a, b) -> float:
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def write_reports(result: SweepResult, out: str, budgets: list[int] | None = None) -> dict[str, str]:
    """sweep.json, sweep.md and sweep.png under `out`."""
    uris = {k: storage.join(out, f"sweep.{k}") for k in ("json", "md", "png")}
    storage.write_bytes(uris["json"], json.dumps({**result.to_dict(), "budgets": budgets,
                                                  "best_per_budget": best_per_budget(result.rows, budgets or [])},
                                                 indent=1).encode())
    storage.write_bytes(uris["md"], markdown_table(result, budgets).encode())
    plot_png(result, uris["png"])
    return uris


def sweep_corpus(inputs, out: str, opts: CompressOptions = CompressOptions(), *, codecs: list[str] | None = None,
                 budgets: list[int] | None = None, executor: Executor) -> tuple[SweepResult, dict[str, str]]:
    """`vecpress sweep`: plan and sample exactly as `compress` would with the same options (same
    seed, same sample), sweep the candidates, write sweep.json / sweep.md / sweep.png under `out`."""
    from vecpress.pipeline.sampling import read_sample, sample_sizes
    from vecpress.pipeline.source import plan_sources

    if budgets and min(budgets) < 1:
        raise ConfigError(f"budgets must be positive byte counts, got {budgets}")
    plan = plan_sources(opts.source(inputs), shard_rows=opts.shard_rows)
    nt, nq = sample_sizes(plan.num_rows, opts.num_train, opts.num_queries)
    specs = candidate_specs(plan.dim, opts.metric, nt, codecs=codecs, budgets=budgets)
    log.info("sweep: %d rows x %d-d, %d candidate codecs: %s", plan.num_rows, plan.dim, len(specs), ", ".join(specs))
    s = read_sample(plan, nt, nq, opts.seed, executor, max_row_groups=opts.sample_row_groups, metric=opts.metric)
    result = run_sweep(plan, s.train, s.queries, s.query_positions, specs, opts, executor=executor)
    return result, write_reports(result, out, budgets)

"""The sweep's plot: codec labels that do not overlap."""

from __future__ import annotations

import itertools

from vecpress.pipeline.sweep import SweepResult
from vecpress.pipeline.sweep_report import plot_png, sweep_figure


def crowded_result() -> SweepResult:
    """Codecs as a real sweep gives them: several of each size, recalls close together."""
    rows = []
    for size, recalls in [(8, [0.30, 0.31, 0.32, 0.33]), (16, [0.52, 0.53, 0.55, 0.55, 0.56]), (32, [0.74, 0.75, 0.77]),
                          (64, [0.90, 0.91]), (128, [0.97, 0.975, 0.98])]:
        for j, recall in enumerate(recalls):
            rows.append({"codec": f"OPQ{size},PQ{size}x{j}", "code_bytes": size, "recall_at_10": recall,
                         "pareto": j == len(recalls) - 1, "rerank": {"4": {"recall_at_10": min(1.0, recall + 0.2)}}})
    return SweepResult(metric="cosine", dim=128, num_rows=100_000, num_train=20_000, num_queries=1000, seed=0,
                       source_bytes=51_200_000, rows=rows)


def overlapping(boxes) -> list:
    return [(a, b) for a, b in itertools.combinations(range(len(boxes)), 2) if boxes[a].overlaps(boxes[b])]


def test_sweep_plot_labels_do_not_overlap(tmp_path):
    import matplotlib.pyplot as plt

    result = crowded_result()
    fig, labels = sweep_figure(result)
    renderer = fig.canvas.get_renderer()
    assert sorted(t.get_text() for t in labels) == sorted(r["codec"] for r in result.rows)
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not overlapping(boxes)
    assert all(fig.bbox.x0 <= b.x0 and b.x1 <= fig.bbox.x1 and fig.bbox.y0 <= b.y0 and b.y1 <= fig.bbox.y1
               for b in boxes)  # none cut off by the figure's edge
    # the same labels all at the old place, up and right of the marker, did overlap
    ax = fig.axes[0]
    old = [ax.annotate(r["codec"], (r["code_bytes"], r["recall_at_10"]), textcoords="offset points", xytext=(4, 4),
                       fontsize=7) for r in result.rows]
    assert overlapping([t.get_window_extent(renderer) for t in old])
    plt.close(fig)
    plot_png(result, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

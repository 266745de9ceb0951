"""The advisor's second stage: its pass over part of the corpus ends at half its rows where, over
them, one front-runner is ahead of every other for good (one more round of successive halving)."""

from __future__ import annotations

import numpy as np
import pytest

from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.preselect import HALF_PASS_LEAD_Z, MIN_LEAD, settled_at_half
from vecpress.pipeline.sweep import run_sweep
from tests.conftest import write_split

N, DIM = 6000, 32


def test_a_front_runner_settles_the_pass_only_ahead_of_every_other_beyond_its_noise():
    rng = np.random.default_rng(0)
    base = rng.integers(5, 10, 400) / 10  # (each query's recall@10)
    behind = base - 0.1 * (np.arange(400) % 2)  # 0.05 behind, 0.1 on every other query: 20 standard errors
    got = settled_at_half({"A": base, "B": behind})
    assert got["leader"] == "A" and got["over"] == "B" and got["by"] == pytest.approx(0.05)
    assert got["standard_errors"] > HALF_PASS_LEAD_Z and "A ahead of B" in got["reason"]
    assert settled_at_half({"B": behind, "A": base}) == got  # (whatever the order)
    # a third as close as MIN_LEAD, however steady, or ahead within the noise, and nothing is settled
    close = base - 0.1 * (np.arange(400) % 20 == 0)  # 0.005 behind
    assert base.mean() - close.mean() < MIN_LEAD
    assert settled_at_half({"A": base, "B": behind, "C": close}) is None
    noisy = base - 0.02 + 0.5 * (-1) ** np.arange(400)  # 0.02 behind, 0.5 either way per query
    lead = base.mean() - noisy.mean()
    assert lead > MIN_LEAD and abs(lead) < HALF_PASS_LEAD_Z * np.std(base - noisy, ddof=1) / 20
    assert settled_at_half({"A": base, "B": behind, "D": noisy}) is None
    assert settled_at_half({"A": base}) is None  # (nothing to rank)


@pytest.fixture(scope="module")
def sample(tmp_path_factory, ray_executor):
    from vecpress.pipeline.sampling import read_sample, sample_sizes
    from vecpress.pipeline.source import plan_sources

    root = tmp_path_factory.mktemp("second_stage")
    write_split(root / "src", ClusteredEmbeddings(DIM, seed=21, num_clusters=48).batch(0, N), [0, 2000, 4000, N],
                "p{}", row_group_size=500)
    opts = CompressOptions(metric="cosine", num_train=2000, num_queries=120, eval_k=10, seed=3)
    plan = plan_sources(opts.source([str(root / "src")]), shard_rows=opts.shard_rows)
    nt, nq = sample_sizes(plan.num_rows, opts.num_train, opts.num_queries)
    return plan, read_sample(plan, nt, nq, opts.seed, ray_executor, metric=opts.metric), opts


def test_the_pass_ends_at_half_its_rows_where_told_and_reads_every_row_where_not(sample, ray_executor):
    plan, s, opts = sample
    specs, asked = ["PQ8", "SQ4", "PQ4"], []

    def sweep(enough=None):
        return run_sweep(plan, s.train, s.queries, s.query_positions, specs, opts, executor=ray_executor,
                         max_rows=3000, enough=enough)

    def settle(recalls):
        asked.append(recalls)
        return {"reason": "told to"}

    whole, kept_on, half = sweep(), sweep(lambda recalls: None), sweep(settle)
    assert whole.stopped_at_half is None and kept_on.stopped_at_half is None
    assert kept_on.num_rows == whole.num_rows and abs(whole.num_rows - 3000) <= 250
    assert [(r["codec"], r["recall_at_10"]) for r in kept_on.rows] == [(r["codec"], r["recall_at_10"])
                                                                      for r in whole.rows]
    # told that the first half settles it: that half's rows only, every other stretch of them, and its table is
    # the recall the question was asked with
    assert half.stopped_at_half == {"reason": "told to"} and len(asked) == 1
    assert whole.num_rows / 4 < half.num_rows < whole.num_rows * 3 / 4
    assert set(asked[0]) == set(specs) and all(len(r) == len(s.queries) for r in asked[0].values())
    for row in half.rows:
        assert row["recall_at_10"] == pytest.approx(asked[0][row["codec"]].mean())
    assert {r["codec"]: r["recall_at_10"] for r in half.rows} != {r["codec"]: r["recall_at_10"] for r in whole.rows}


def test_a_codec_trained_to_be_judged_runs_fewer_k_means_iterations_and_nothing_else_changes():
    """train_candidates(judging=True) (the advisor's first stage, and its second stage's codecs on
    fewer rows than the sample's, which are never kept) trains a PQ's sub-quantizers with
    JUDGING_PQ_ITERATIONS k-means iterations, not faiss's 25, and a residual quantizer's stages'
    k-means in JUDGING_RQ_STEPS progressive steps, the last with JUDGING_RQ_LAST_ITERATIONS
    iterations, a longer one grown from a shorter one alike: the codecs Codec.train gives with
    JUDGING, not the ones it gives by default; other codecs are trained as ever."""
    from vecpress.kernels.codecs.codec import Codec
    from vecpress.kernels.codecs.train import RQ_PROGRESSIVE
    from vecpress.pipeline.sweep import (JUDGING, JUDGING_PQ_ITERATIONS, JUDGING_RQ_LAST_ITERATIONS, JUDGING_RQ_STEPS,
                                         train_candidates)

    xt = ClusteredEmbeddings(DIM, seed=4, num_clusters=20).batch(0, 3_000)
    specs = ["PQ4", "PQ8x4fs", "SQ4", "RQ2x5,beam=1"]
    judged = {tc.spec: tc for tc in train_candidates(specs, xt, "cosine", seed=1, ngpu=0, failed=[], judging=True)}
    kept = {tc.spec: tc for tc in train_candidates(specs, xt, "cosine", seed=1, ngpu=0, failed=[])}
    grown = train_candidates(["RQ3x5,beam=1"], xt, "cosine", seed=1, ngpu=0, failed=[], judging=True,
                             grown_from={"RQ3x5,beam=1": judged["RQ2x5,beam=1"]})[0]
    assert grown.blob == Codec.train(xt, "RQ3x5,beam=1", "cosine", seed=1, ngpu=0, iterations=JUDGING).to_bytes()
    for spec in ("PQ4", "PQ8x4fs", "RQ2x5,beam=1"):
        fewer = Codec.train(xt, spec, "cosine", seed=1, ngpu=0, iterations=JUDGING)
        assert judged[spec].blob == fewer.to_bytes(), spec
        assert kept[spec].blob == Codec.train(xt, spec, "cosine", seed=1, ngpu=0).to_bytes(), spec
        assert judged[spec].blob != kept[spec].blob, spec  # (fewer iterations: other centroids)
    assert judged["SQ4"].blob == kept["SQ4"].blob
    assert JUDGING_PQ_ITERATIONS < 25 and JUDGING_RQ_LAST_ITERATIONS < RQ_PROGRESSIVE[1]
    assert JUDGING_RQ_STEPS < RQ_PROGRESSIVE[0]

"""Issue 3: every codec family through compress -> inspect -> search, the sweep, and the advisor."""

from __future__ import annotations

import json
import struct

import lance
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline.errors import ConfigError
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.run import run_compress
from vecpress.pipeline.report import inspect_table
from vecpress.pipeline.search import search
from vecpress.pipeline.sweep import choose, mark_pareto
from vecpress.pipeline.sweep_report import sweep_corpus
from tests.conftest import write_split

N, DIM = 6000, 32
COMMON = dict(num_train=3000, num_queries=150, eval_k=100, seed=3)
FAST = ["PQ4", "PQ8", "PQ8x4fs", "SQ4", "SQ8", "BIN", "RaBitQ", "MRL16,PQ8"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("advisor")
    x = ClusteredEmbeddings(DIM, seed=21, num_clusters=48).batch(0, N)
    write_split(root / "src", x, [0, 2000, 4000, N], "p{}", row_group_size=500)
    return root, x


@pytest.fixture(scope="module")
def swept(corpus, ray_executor):
    root, _ = corpus
    result, uris = sweep_corpus([str(root / "src")], str(root / "sweep"), CompressOptions(metric="cosine", **COMMON),
                                codecs=FAST, budgets=[4, 8, 16, 32], executor=ray_executor)
    return result, uris


def exact_top(xq, x, k, metric):
    if metric == "cosine":
        xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    if metric in ("cosine", "ip"):
        D = -(xq @ x.T)
    else:
        D = ((xq[:, None] - x[None]) ** 2).sum(-1)
    return np.argsort(D, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("spec,metric", [
    ("PQ8", "l2"), ("PQ8x4fs", "cosine"), ("OPQ4,PQ4", "l2"), ("RQ4x8,beam=4", "l2"), ("LSQ2x8", "l2"),
    ("PRQ2x2x8", "l2"), ("PLSQ2x2x8", "cosine"),
    ("SQ4", "cosine"), ("SQ8,calibrate=0.01", "l2"), ("SQfp16", "ip"), ("SQbf16", "l2"), ("RaBitQ", "l2"),
    ("RaBitQ4", "cosine"), ("BIN", "cosine"), ("BINt", "l2"), ("MRL16,PQ8", "cosine"), ("PCA16,PQ8", "l2"),
])
def test_every_family_round_trips(corpus, tmp_path, ray_executor, spec, metric):
    root, x = corpus
    out = str(tmp_path / "out")
    result = run_compress([str(root / "src")], out, "t",
                          CompressOptions(codec=spec, metric=metric, keep=("text",), **COMMON), executor=ray_executor)
    info = inspect_table(out, "t")
    codec = Codec.from_bytes(open(info["codec_uri"], "rb").read(), spec=spec, metric=metric)
    assert info["codec"] == spec and info["code_bytes"] == codec.code_size and info["num_rows"] == N
    assert 0 < info["eval"]["recall_at_10"] <= 1 and info["eval"]["relative_error"] >= 0
    # the stored codes are what the codec file makes of the source
    ds = lance.dataset(f"{out}/t.lance")
    code_type = ds.schema.field("code").type
    assert code_type == (pa.list_(pa.uint8(), codec.code_size) if codec.is_binary else pa.binary(codec.code_size))
    from vecpress.pipeline.schema import codes_as_numpy

    # (the corpus is one batch, its small files read together: LSQ's encoder is seeded per call,
    # so its codes depend on batching)
    stored = codes_as_numpy(ds.to_table(columns=["code"]).column(0))
    assert np.array_equal(stored, codec.encode(x))
    # search with exact re-ranking finds true neighbours of new vectors
    xq = ClusteredEmbeddings(DIM, seed=21, num_clusters=48).batch(90_000, 10)
    got = search(out, "t", xq, 10, rerank=10).column("id").to_numpy().reshape(10, 10)
    truth = exact_top(xq, x, 10, metric)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)]) > 0.8
    assert result.eval["rerank"]["10"]["recall_at_10"] >= result.eval["recall_at_10"]


def test_binary_codes_search_the_same_in_lancedb(corpus, tmp_path, ray_executor):
    root, _ = corpus
    out = str(tmp_path / "out")
    run_compress([str(root / "src")], out, "bin", CompressOptions(codec="BIN", metric="cosine", **COMMON),
                 executor=ray_executor)
    from vecpress.pipeline.search import query_codes

    xq = ClusteredEmbeddings(DIM, seed=21, num_clusters=48).batch(70_000, 8)
    ours = search(out, "bin", xq, 10)
    table = lancedb.connect(out).open_table("bin")
    for q, qcode in enumerate(query_codes(out, "bin", xq)):  # the one call that makes a query searchable there
        theirs = table.search(qcode, vector_column_name="code").distance_type("hamming").limit(10).to_pandas()
        mine = ours.filter(pa.compute.equal(ours.column("query"), q))
        d_mine = mine.column("distance").to_numpy()
        d_theirs = theirs["_distance"].to_numpy()
        np.testing.assert_array_equal(d_mine, d_theirs)  # same Hamming distances, in order
        strict = d_mine < d_mine[-1]  # ids above the last tie must agree exactly
        assert set(mine.column("id").to_numpy()[strict]) == set(theirs["id"].to_numpy()[strict])


def test_sweep_reports(swept):
    result, uris = swept
    codecs = [r["codec"] for r in result.rows]
    assert sorted(codecs) == sorted(FAST) and not result.failed
    png = open(uris["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 400 and height > 300
    md = open(uris["md"]).read()
    assert all(f"`{c}`" in md for c in codecs) and "Best recall@10 within each budget" in md
    data = json.loads(open(uris["json"]).read())
    assert data["pareto"] == [r["codec"] for r in result.rows if r["pareto"]]
    for r in result.rows:
        assert set(r) >= {"code_bytes", "recall_at_1", "recall_at_10", "recall_at_100", "rerank", "relative_error",
                          "train_seconds", "encode_rows_per_second"}
        assert r["rerank"]["10"]["recall_at_10"] >= r["recall_at_10"] - 1e-9
        # Pareto: nothing smaller-or-equal is better
        dominated = any(o is not r and o["code_bytes"] <= r["code_bytes"] and o["recall_at_10"] >= r["recall_at_10"]
                        and (o["code_bytes"] < r["code_bytes"] or o["recall_at_10"] > r["recall_at_10"])
                        for o in result.rows)
        assert r["pareto"] == (not dominated)


def test_advisor_pick_is_best_in_its_own_table_per_budget(corpus, tmp_path, swept, ray_executor):
    root, _ = corpus
    result, _ = swept
    for budget in (8, 16):
        out = str(tmp_path / f"out{budget}")
        run = run_compress([str(root / "src")], out, "t",
                           CompressOptions(codec="auto", max_bytes=budget, metric="cosine", advise_codecs=tuple(FAST),
                                           **COMMON), executor=ray_executor)
        advisor = inspect_table(out, "t")["advisor"]
        table = advisor["table"]
        best = max(r["recall_at_10"] for r in table if r["code_bytes"] <= budget)
        assert advisor["code_bytes"] <= budget and advisor["chosen_recall_at_10"] >= best - 0.01
        assert run.manifest["codec"]["spec"] == advisor["chosen"]
        # its own table is the standalone sweep's table (same sample, same seed)
        sweep_best = choose(result.rows, max_bytes=budget)
        assert advisor["chosen"] == sweep_best["codec"]


def test_min_recall_picks_smallest_codec_reaching_it(swept):
    rows = swept[0].rows
    target = sorted(r["recall_at_10"] for r in rows)[len(rows) // 2]
    pick = choose(rows, min_recall=target)
    assert pick["recall_at_10"] >= target
    assert all(r["code_bytes"] >= pick["code_bytes"] for r in rows if r["recall_at_10"] >= target)
    with_rerank = choose(rows, min_recall=target, rerank=10)
    assert with_rerank["code_bytes"] <= pick["code_bytes"]
    with pytest.raises(ConfigError, match="no swept codec reaches recall@10 0.99.*the best is"):
        choose([{**r, "recall_at_10": min(r["recall_at_10"], 0.9)} for r in rows], min_recall=0.99)


def test_sweep_matches_full_compress(corpus, swept, tmp_path, ray_executor):
    root, _ = corpus
    result, _ = swept
    for spec in ("PQ8", "SQ4", "BIN"):
        run = run_compress([str(root / "src")], str(tmp_path / spec.replace(",", "_")), "t",
                           CompressOptions(codec=spec, metric="cosine", **COMMON), executor=ray_executor)
        row = next(r for r in result.rows if r["codec"] == spec)
        assert run.manifest["codec"]["sha256"] == row["sha256"]  # same sample + seed: the same codec
        assert run.eval["recall_at_10"] == pytest.approx(row["recall_at_10"], abs=0.02)
        assert run.eval["rerank"]["4"]["recall_at_10"] == pytest.approx(row["rerank"]["4"]["recall_at_10"], abs=0.02)


@pytest.mark.parametrize("opts,needle", [
    (dict(codec="auto"), "needs a target"),
    (dict(codec="PQ8", max_bytes=8), "cannot be combined"),
    (dict(max_bytes=8, min_recall=0.5), "not both"),
    (dict(min_recall=1.5), "must be in"),
    (dict(max_bytes=8, advise_rerank=3), "advise_rerank"),
])
def test_advisor_options_are_validated(opts, needle):
    with pytest.raises(ConfigError, match=needle):
        CompressOptions(**opts)


def test_advisor_budget_nothing_fits(corpus, tmp_path, ray_executor):
    root, _ = corpus
    with pytest.raises(ConfigError, match="no codec to sweep|fits in"):
        run_compress([str(root / "src")], str(tmp_path / "o"), "t",
                     CompressOptions(max_bytes=1, advise_codecs=("SQ8",), **COMMON), executor=ray_executor)
    assert not (tmp_path / "o" / "t.lance" / "_versions").exists()


def test_mark_pareto():
    rows = [{"code_bytes": 8, "recall_at_10": 0.5}, {"code_bytes": 8, "recall_at_10": 0.4},
            {"code_bytes": 16, "recall_at_10": 0.45}, {"code_bytes": 16, "recall_at_10": 0.7}]
    mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [True, False, False, True]


@pytest.mark.parametrize(("criterion", "decided_in"), [
    (dict(max_bytes=16), "second stage"),  # (a small sample: the 4 best go on, whatever their lead)
    (dict(max_bytes=16, second_stage_rows=2500), "second stage"),  # (swept over part of the corpus)
    # (SQ4 leads SQeden4 by 0.027 here: a clear leader with a margin of 0.015)
    (dict(max_bytes=16, full_first_stage=True, lead_margin=0.015), "first stage"),
    (dict(min_recall=0.6), "second stage"),
])
def test_the_default_grid_is_judged_in_two_stages_and_picks_as_a_full_sweep(corpus, tmp_path, ray_executor,
                                                                          criterion, decided_in, monkeypatch):
    """Every candidate of the default grid is trained on a small part of the sample first;
    only the front-runners are swept over the corpus (or a clear leader chosen in the first
    stage), and the pick is within 0.01 recall@10 (with max_bytes) of the best codec of a full
    sweep of the same grid, or as cheap (with min_recall) as the full sweep's."""
    from vecpress.kernels.codecs.grid import default_grid, held_by_finer
    from vecpress.pipeline import preselect
    from vecpress.pipeline.preselect import FRONT_RUNNERS
    from vecpress.pipeline.stages import s04_advise

    criterion = dict(criterion)
    if criterion.pop("full_first_stage", False):  # (this sample's first stage taken as full-size: its margin applies)
        monkeypatch.setattr(preselect, "STAGE1_TRAIN_ROWS", COMMON["num_train"] // 2)
    if "lead_margin" in criterion:
        monkeypatch.setattr(preselect, "LEAD_MARGIN", criterion.pop("lead_margin"))
    part = criterion.pop("second_stage_rows", None)
    if part:
        monkeypatch.setattr(s04_advise, "SECOND_STAGE_ROWS", part)
    root, _ = corpus
    out = str(tmp_path / "out")
    run_compress([str(root / "src")], out, "t", CompressOptions(codec="auto", metric="cosine", **criterion, **COMMON),
                 executor=ray_executor)
    advisor = inspect_table(out, "t")["advisor"]
    stage = advisor["first_stage"]
    grid = default_grid(DIM, "cosine", min_bytes=8, max_bytes=criterion.get("max_bytes", 256))
    # (with --max-bytes, those a finer one of their family holds are not tried: the full sweep below has them)
    held = advisor["held_by_finer"]
    assert held == (held_by_finer(grid) if "max_bytes" in criterion else {}) and ("max_bytes" not in criterion or held)
    assert [r["codec"] for r in stage["rows"]] == [s for s in grid if s not in held]
    assert len(stage["kept"]) <= FRONT_RUNNERS
    assert advisor["chosen"] in stage["kept"] and advisor["decided_in"] == decided_in
    assert stage["lead_margin"] == (preselect.LEAD_MARGIN if decided_in == "first stage" else None)
    if advisor["decided_in"] == "first stage":  # a clear leader: no second stage, the train stage trains it
        assert "max_bytes" in criterion and stage["kept"] == [advisor["chosen"]] and advisor["table"] == []
        assert "more than" in advisor["reason"] and "first stages" not in advisor["reason"]  # (no RQ family here)
        assert inspect_table(out, "t")["codec"] == advisor["chosen"]
    else:
        assert {r["codec"] for r in advisor["table"]} == set(stage["kept"])
        # with --max-bytes, part of a corpus larger than SECOND_STAGE_ROWS (whole row groups of
        # 500: within half of one), or the first half of it where a front-runner led for good
        # there; --min-recall's target needs every row
        stopped = advisor["stopped_at_half"]
        assert not stopped or ("max_bytes" in criterion and stopped["leader"] == advisor["chosen"]
                               and "ended at half" in advisor["reason"])
        if stopped:
            assert 0 < advisor["swept_rows"] < (part or N)
        else:
            assert advisor["swept_rows"] == N if not part else abs(advisor["swept_rows"] - part) <= 250
        assert (f"of {N:,} rows" in advisor["reason"]) == (bool(part) or bool(stopped))
    full, _ = sweep_corpus([str(root / "src")], str(tmp_path / "full"), CompressOptions(metric="cosine", **COMMON),
                           codecs=grid, executor=ray_executor)
    recall = {r["codec"]: r["recall_at_10"] for r in full.rows}
    if "max_bytes" in criterion:
        assert recall[advisor["chosen"]] >= choose(full.rows, **criterion)["recall_at_10"] - 0.01
    else:
        assert advisor["code_bytes"] <= choose(full.rows, **criterion)["code_bytes"]


def test_front_runners_are_those_close_to_the_first_stages_best():
    from vecpress.pipeline.preselect import LEAD_MARGIN, front_runners

    def rows(*recalls):
        return [{"codec": f"C{i}", "code_bytes": 8 * (1 + i % 2), "recall_at_10": r} for i, r in enumerate(recalls)]

    assert front_runners(rows(0.70, 0.66, 0.60, 0.69), max_bytes=16, min_recall=None) == ["C0", "C3", "C1"]
    assert front_runners(rows(0.70, 0.70 - LEAD_MARGIN - 0.01, 0.2), max_bytes=16, min_recall=None) == ["C0"]
    assert front_runners(rows(*[0.5] * 6), max_bytes=16, min_recall=None, keep=4) == ["C0", "C2", "C4", "C1"]
    # a residual quantizer cut from a longer one ahead of it: no further (one ahead of the longer one goes on)
    cut = [{"codec": "RQ4", "code_bytes": 4, "recall_at_10": 0.68, "cut_from": "RQ8"},
           {"codec": "RQ8", "code_bytes": 8, "recall_at_10": 0.70}, {"codec": "PQ8", "code_bytes": 8, "recall_at_10": 0.6}]
    assert front_runners(cut, max_bytes=8, min_recall=None) == ["RQ8"]
    assert front_runners(cut, max_bytes=8, min_recall=None, margin=None) == ["RQ8", "PQ8"]
    cut[0]["recall_at_10"] = 0.71
    assert front_runners(cut, max_bytes=8, min_recall=None) == ["RQ4", "RQ8"]
    # (over the budget: not judged; nothing within it: the first `keep` as they came)
    assert front_runners(rows(0.5, 0.9), max_bytes=8, min_recall=None) == ["C0"]
    assert front_runners(rows(0.5, 0.9), max_bytes=4, min_recall=None) == ["C0", "C1"]


def test_a_sweep_cuts_shorter_residual_quantizers_from_the_longest(corpus, tmp_path, ray_executor):
    """RQ2x8 swept beside RQ4x8 is cut from RQ4x8's training: the same codes, so the same
    recall as RQ2x8 swept alone, without its own k-means."""
    root, _ = corpus
    opts = CompressOptions(metric="cosine", **COMMON)
    both, _ = sweep_corpus([str(root / "src")], str(tmp_path / "both"), opts, codecs=["RQ2x8", "RQ4x8,beam=1"],
                           executor=ray_executor)
    alone, _ = sweep_corpus([str(root / "src")], str(tmp_path / "alone"), opts, codecs=["RQ2x8"],
                            executor=ray_executor)
    cut = next(r for r in both.rows if r["codec"] == "RQ2x8")
    assert cut["cut_from"] == "RQ4x8,beam=1" and alone.rows[0]["cut_from"] is None
    for key in ("recall_at_1", "recall_at_10", "recall_at_100", "relative_error"):
        assert cut[key] == alone.rows[0][key], key


@pytest.fixture(scope="module")
def stage_sample():
    x = ClusteredEmbeddings(DIM, seed=8, num_clusters=40).batch(0, 6_200)
    return x[:6_000], x[6_000:]


@pytest.mark.parametrize("margin", [-1.0, 1.0])
def test_the_longest_residual_quantizer_is_judged_by_its_first_stages_first(stage_sample, monkeypatch, margin):
    """--max-bytes: the first stage judges RQ2x6 (the first stages of RQ3x6 and RQ4x6, the
    shortest of the family) before it trains the rest of the family. Ahead of every other
    candidate by more than the margin (-1: any lead), RQ4x6 holds it and more, so it leads
    too and is chosen untrained there (RQ3x6 not judged); otherwise RQ4x6 is trained on from
    RQ2x6's stages, to the codec the first stage trained whole before, and RQ3x6 cut from it
    (here where RQ4x6 is not sent on as it is: `_goes_on_as_it_is`, tested below)."""
    from vecpress.pipeline import preselect as ps

    monkeypatch.setattr(ps, "STAGE1_TRAIN_ROWS", 2_500)  # (6-bit stages: 39 x 64 rows, and the margin applies)
    monkeypatch.setattr(ps, "STAGE1_BASE_ROWS", 3_000)
    monkeypatch.setattr(ps, "LEAD_MARGIN", margin)
    monkeypatch.setattr(ps, "_goes_on_as_it_is", lambda *a: None)
    monkeypatch.setattr(ps, "ROUGH_LEAD_Z", margin * float("inf"))  # (1: no lead settles it, however rough)
    xt, xq = stage_sample
    specs = ["PQ4", "RQ2x6", "PQ8x4fs", "RQ3x6", "BIN", "RQ4x6", "SQ4"]
    kept, record, _ = ps.preselect(specs, xt, xq, metric="cosine", seed=3, ngpu=0, max_bytes=16, min_recall=None)
    rows = {r["codec"]: r for r in record["rows"]}
    assert [r["codec"] for r in record["rows"]] == [s for s in specs if margin > 0 or s != "RQ3x6"]
    # min_recall: every candidate trained whole (the longest first, the shorter cut from it)
    _, whole, _ = ps.preselect(specs, xt, xq, metric="cosine", seed=3, ngpu=0, max_bytes=None, min_recall=0.5)
    whole = {r["codec"]: r for r in whole["rows"]}
    assert rows["RQ2x6"]["recall_at_10"] == whole["RQ2x6"]["recall_at_10"]
    if margin < 0:
        assert kept == ["RQ4x6"] and "cut_from" not in rows["RQ2x6"]  # (trained alone: not cut from RQ3x6)
        assert rows["RQ4x6"] == {"codec": "RQ4x6", "code_bytes": 3, "recall_at_10": rows["RQ2x6"]["recall_at_10"],
                                 "centroids_per_codebook": 64, "codebook_parameters": 64 * DIM, "seconds": 0.0,
                                 "judged_by": "RQ2x6"}
    else:
        assert rows["RQ4x6"]["trained_on_from"] == "RQ2x6" and rows["RQ2x6"]["cut_from"] == "RQ4x6"
        assert rows["RQ3x6"]["cut_from"] == "RQ4x6" and "trained_on_from" not in rows["RQ3x6"]
        for spec in ("RQ3x6", "RQ4x6"):
            assert rows[spec]["recall_at_10"] == whole[spec]["recall_at_10"]
        assert rows["RQ4x6"]["recall_at_10"] > rows["RQ2x6"]["recall_at_10"]
        assert "RQ2x6" not in kept and "RQ3x6" not in kept  # (the nesting rule: RQ4x6 ahead of them)


@pytest.mark.parametrize("settles", [None, "RQ4x6", "goes on"])
def test_a_residual_quantizer_family_is_judged_by_lengths_doubling(stage_sample, monkeypatch, settles):
    """--max-bytes: a family of five lengths is judged by RQ2x6, then RQ4x6 trained on from its
    stages (RQ3x6 cut from it), then RQ8x6 from those (RQ6x6 cut from it): each the codec the
    first stage trains whole. A length ahead of the rest for good (here: RQ4x6, or none)
    ends it: RQ8x6, which holds it, is chosen untrained there, judged by it. So does a length
    behind, where RQ8x6 goes on whatever the rest adds and could not lead for good
    (`_goes_on_as_it_is`, asked from the first length on, RQ2x6 against RQ1x6, its first half
    cut from it: a yardstick, not a candidate): RQ8x6 goes on to the second stage untrained
    here, judged by the length asked (here RQ4x6)."""
    from vecpress.pipeline import preselect as ps

    monkeypatch.setattr(ps, "STAGE1_TRAIN_ROWS", 2_500)
    monkeypatch.setattr(ps, "STAGE1_BASE_ROWS", 3_000)
    real = ps._settled_by
    monkeypatch.setattr(ps, "_settled_by", lambda a, b, hits, margin: a["codec"] == settles and real(a, b, hits, -1.0))
    asked = []
    stop = {"behind": "PQ4", "by": 0.01, "projected": 0.8, "needs": 0.06, "gained": 0.02}
    monkeypatch.setattr(ps, "_goes_on_as_it_is", lambda rows, below, before, *a: asked.append((below, before))
                        or (stop if settles == "goes on" and below == "RQ4x6" else None))
    xt, xq = stage_sample
    specs = ["PQ4", "RQ2x6", "RQ3x6", "PQ8x4fs", "RQ4x6", "RQ6x6", "SQ4", "RQ8x6"]
    assert ps._judging_order(ps.nesting(specs, DIM, greedy=True), DIM) == {"RQ8x6": ["RQ2x6", "RQ4x6", "RQ8x6"]}
    kept, record, _ = ps.preselect(specs, xt, xq, metric="cosine", seed=3, ngpu=0, max_bytes=16, min_recall=None)
    rows = {r["codec"]: r for r in record["rows"]}
    _, whole, _ = ps.preselect(specs, xt, xq, metric="cosine", seed=3, ngpu=0, max_bytes=None, min_recall=0.5)
    whole = {r["codec"]: r for r in whole["rows"]}
    assert rows["RQ4x6"]["trained_on_from"] == "RQ2x6" and "trained_on_from" not in rows["RQ3x6"]
    # (the first length asked against its first half, RQ1x6, judged as a yardstick: no row of its own)
    assert asked == [("RQ2x6", "RQ1x6")] + ([] if settles == "RQ4x6" else [("RQ4x6", "RQ2x6")])
    assert "RQ1x6" not in rows
    if settles == "goes on":
        assert "RQ8x6" in kept and "RQ6x6" not in rows and rows["RQ8x6"]["judged_by"] == "RQ4x6"
        assert rows["RQ8x6"]["recall_at_10"] == rows["RQ4x6"]["recall_at_10"] and rows["RQ8x6"]["seconds"] == 0.0
        assert rows["RQ8x6"]["chain_stopped"] == stop  # (why, in the manifest's first stage)
        assert rows["RQ8x6"]["projected_recall_at_10"] == stop["projected"]  # (what front_runners ranks it by)
        assert {rows[s]["cut_from"] for s in ("RQ2x6", "RQ3x6", "RQ4x6")} == {"RQ8x6"}
        assert not {"RQ2x6", "RQ3x6", "RQ4x6"} & set(kept)  # (RQ8x6 holds them: ahead of them on a tie)
    elif settles:
        assert kept == ["RQ8x6"] and "RQ6x6" not in rows and rows["RQ8x6"]["judged_by"] == "RQ4x6"
        assert rows["RQ2x6"]["cut_from"] == rows["RQ3x6"]["cut_from"] == "RQ4x6"
        assert record["lead"]["rule"] == "margin"
    else:
        assert rows["RQ8x6"]["trained_on_from"] == "RQ4x6" and "trained_on_from" not in rows["RQ6x6"]
        assert {rows[s]["cut_from"] for s in ("RQ2x6", "RQ3x6", "RQ4x6", "RQ6x6")} == {"RQ8x6"}
        assert "RQ8x6" in kept and not {"RQ2x6", "RQ3x6", "RQ4x6", "RQ6x6"} & set(kept)  # (cut: behind it)
    for spec in set(rows) - {"RQ8x6" if settles else None}:  # (trained here as on their own)
        assert rows[spec]["recall_at_10"] == whole[spec]["recall_at_10"], spec


def test_a_family_goes_on_judged_by_its_first_stages_where_more_is_not_expected_to_lead_for_good():
    """`_goes_on_as_it_is`: the next length after RQ4 (the first stages of the family's longest,
    RQ8), projected PROJECTED_SHARE of what RQ4 gained over RQ2 above RQ4, is not behind the
    best of the rest for good, with fewer than FRONT_RUNNERS at or above it; the next length
    would need a lead over them all (LEAD_MARGIN over a rival whose k-means fits as many
    parameters, an additive quantizer's here; MIN_LEAD and ROUGH_LEAD_Z standard errors over
    one with fewer) beyond CHAIN_GAIN_SHARE (a half) of what RQ4 gained over RQ2."""
    from vecpress.pipeline import preselect as ps

    def row(codec, recall, centroids=256, dims=384):
        return {"codec": codec, "code_bytes": 8, "recall_at_10": recall, "centroids_per_codebook": centroids,
                "codebook_parameters": centroids * dims}

    def asks(*rivals, before=0.76, below=0.80):
        rows = {r["codec"]: r for r in (row("RQ2", before), row("RQ4", below), *rivals)}
        hits = {c: np.full(300, r["recall_at_10"]) for c, r in rows.items()}  # (no noise: a standard error of 0)
        family = {"RQ2", "RQ4", "RQ8"}
        return ps._goes_on_as_it_is(rows, "RQ4", "RQ2", ps._rivals(rows, family, 8), family, hits, 0.05, 8)

    assert ps.CHAIN_GAIN_SHARE == 0.5 and ps.PROJECTED_SHARE == 0.35
    # LSQ 0.02 ahead: RQ8 would need 0.07 over RQ4 to lead it for good, RQ4 gained 0.04 over RQ2 (the next
    # length projected at 0.80 + 0.35 x 0.04)
    stop = asks(row("LSQ", 0.82), row("SQ", 0.6, 0))
    assert stop == {"behind": "LSQ", "by": 0.02, "projected": 0.814, "needs": 0.07, "gained": 0.04}
    assert asks(row("LSQ", 0.82), before=0.67)  # (it gained 0.13: RQ8 would need over half)
    assert not asks(row("LSQ", 0.82), before=0.64)  # (it gained 0.16: RQ8 is expected to)
    # RQ4 leads, not for good: RQ8 would need 0.04, a whole of RQ4's gain; 0.1 gained, and it is expected to
    assert asks(row("LSQ", 0.79)) == {"ahead_of": "LSQ", "by": 0.01, "projected": 0.814, "needs": 0.04,
                                      "gained": 0.04}
    assert not asks(row("LSQ", 0.79), before=0.70)
    # RQ4 behind for good (0.06), its next length projected not (0.046): RQ8 goes on whatever the rest adds
    assert asks(row("LSQ", 0.86)) == {"behind": "LSQ", "by": 0.06, "projected": 0.814, "needs": 0.11, "gained": 0.04}
    assert not asks(row("LSQ", 0.87))  # (the projection behind for good too: the rest of it must show it catches up)
    assert not asks(row("LSQ", 0.86), before=0.81)  # (no gain, no projection above RQ4 itself)
    assert not asks(row("LSQ", 0.82), *[row(f"LSQ{i}", 0.815) for i in range(3)])  # (4 ahead: RQ8 might not go on)
    assert asks(row("LSQ", 0.82), *[row(f"LSQ{i}", 0.81) for i in range(3)])  # (3 of them below the projection)
    assert asks(row("LSQ", 0.82), *[row(f"LSQ{i}", 0.815) for i in range(2)], row("BIN", 0.76, 0))
    # a rival with fewer parameters: settled by MIN_LEAD (no noise) over it, 0.02 above RQ4 here (4-bit PQ, and
    # 8-bit PQ: its centroids span a sub-vector's dims)
    for fewer in (row("FS", 0.81, 16, 3), row("PQ", 0.81, 256, 8)):
        assert not asks(fewer, before=0.75)
        assert asks(fewer, before=0.77)
    # a shorter one of the family ahead of RQ4's projection takes a place too
    shorter = row("RQ3", 0.815) | {"cut_from": "RQ4"}
    assert not asks(row("LSQ", 0.82), *[row(f"LSQ{i}", 0.815) for i in range(2)], shorter)


def test_front_runners_rank_a_family_sent_on_as_it_is_by_its_projection_and_never_settle_by_it():
    """A residual family's longest sent on judged by its first stages (`judged_by`) is ranked by
    its next length's projected recall@10 (`projected_recall_at_10`: it holds that length), not
    by the first stages' own; the rows it is projected ahead of are still judged against the
    best measured one, so a projection never settles another candidate."""
    from vecpress.pipeline import preselect as ps

    def row(codec, recall, **more):
        return {"codec": codec, "code_bytes": 8, "recall_at_10": recall, **more}

    rq = row("RQ8", 0.70, judged_by="RQ4", projected_recall_at_10=0.95)
    rows = [row("PQ", 0.80), row("SQ", 0.74), row("BIN", 0.60), rq, row("RQ4", 0.70, cut_from="RQ8")]
    # (by its floor, 0.70, PQ would settle it by the margin; the projection 0.95 would settle every other)
    assert ps.front_runners(rows, max_bytes=8, min_recall=None, margin=0.05) == ["RQ8", "PQ"]
    assert ps.front_runners(rows, max_bytes=8, min_recall=None, margin=0.1) == ["RQ8", "PQ", "SQ"]
    assert ps.front_runners([r for r in rows if r is not rq], max_bytes=8, min_recall=None, margin=0.05) == ["PQ"]


def test_a_candidate_with_the_codes_of_another_takes_no_front_runners_place(stage_sample, monkeypatch):
    """Under cosine EDEN's scaled levels and TurboQuant-MSE's give the same codes: the second
    one judged is marked the same codec and does not go on, where with four places and no
    margin (a small first stage) it would have taken one."""
    from vecpress.pipeline import preselect as ps

    monkeypatch.setattr(ps, "STAGE1_BASE_ROWS", 3_000)
    xt, xq = stage_sample
    specs = ["SQeden2", "SQtqmse2", "SQeden1", "SQtqmse1", "PQ4", "BIN"]
    kept, record, _ = ps.preselect(specs, xt, xq, metric="cosine", seed=3, ngpu=0, max_bytes=8, min_recall=None)
    rows = {r["codec"]: r for r in record["rows"]}
    assert record["lead_margin"] is None and len(kept) == ps.FRONT_RUNNERS  # (the 4 best go on)
    for a, b in (("SQeden2", "SQtqmse2"), ("SQeden1", "SQtqmse1")):
        assert rows[b]["same_codes_as"] == a and rows[b]["recall_at_10"] == rows[a]["recall_at_10"]
        assert "same_codes_as" not in rows[a] and b not in kept
    assert set(kept) == {"SQeden2", "SQeden1", "PQ4", "BIN"}
    assert not any("same_codes_as" in r for c, r in rows.items() if c in ("PQ4", "BIN"))


def test_few_candidates_go_through_a_first_stage_only_where_it_can_choose(stage_sample, monkeypatch):
    """No more candidates than FRONT_RUNNERS: with --max-bytes and a full-size first stage, a
    clear leader is still chosen there (no second stage); without --max-bytes, or on fewer
    than STAGE1_TRAIN_ROWS rows (no margin applies), they all go on untried."""
    from vecpress.pipeline import preselect as ps

    monkeypatch.setattr(ps, "STAGE1_TRAIN_ROWS", 2_500)
    monkeypatch.setattr(ps, "STAGE1_BASE_ROWS", 3_000)
    monkeypatch.setattr(ps, "LEAD_MARGIN", 0.05)
    xt, xq = stage_sample
    specs = ["PQ8", "BIN", "SQeden1"]
    kw = dict(metric="cosine", seed=3, ngpu=0)
    kept, record, _ = ps.preselect(specs, xt, xq, max_bytes=8, min_recall=None, **kw)
    rows = {r["codec"]: r for r in record["rows"]}
    assert kept == ["PQ8"] and record["lead"]["over"] in ("BIN", "SQeden1")
    assert rows["PQ8"]["recall_at_10"] > max(rows["BIN"]["recall_at_10"], rows["SQeden1"]["recall_at_10"]) + 0.05
    assert ps.preselect(specs, xt, xq, max_bytes=None, min_recall=0.5, **kw) == (specs, None, {})
    monkeypatch.setattr(ps, "STAGE1_TRAIN_ROWS", 10_000)  # (a sample of 6,000: a first stage of 3,000 rows)
    assert ps.preselect(specs, xt, xq, max_bytes=8, min_recall=None, **kw) == (specs, None, {})


def test_a_leader_judged_the_more_roughly_needs_only_a_lead_beyond_its_noise(stage_sample, monkeypatch):
    """Within LEAD_MARGIN (1 here: no lead is that far ahead), a first-stage leader whose
    k-means fits more parameters than its rivals' (PQ8's 256 centroids of 4 dims against none
    for the scalar and binary codecs, 16 of 32 dims for RQ2x4) trains on fewer rows per
    parameter, so it is judged the more roughly: ahead of each by more than ROUGH_LEAD_Z
    standard errors of the per-query difference, it is chosen there. A lead inside that noise,
    or a leader that fits fewer parameters than a rival (SQ4: none, against PQ8; PQ8 against
    RQ4x6's 64 centroids of 32 dims), goes on to the second stage."""
    from vecpress.pipeline import preselect as ps
    from vecpress.pipeline.stages.s04_advise import _lead_text

    monkeypatch.setattr(ps, "STAGE1_TRAIN_ROWS", 2_500)
    monkeypatch.setattr(ps, "STAGE1_BASE_ROWS", 3_000)
    monkeypatch.setattr(ps, "LEAD_MARGIN", 1.0)
    xt, xq = stage_sample
    specs = ["PQ8", "SQeden2", "BIN", "BINt", "SQeden1", "RQ2x4"]
    kw = dict(metric="cosine", seed=3, ngpu=0, min_recall=None)
    kept, record, _ = ps.preselect(specs, xt, xq, max_bytes=8, **kw)
    rows = {r["codec"]: r for r in record["rows"]}
    second = max((r for r in record["rows"] if r["codec"] != "PQ8"), key=lambda r: r["recall_at_10"])
    lead = record["lead"]
    assert kept == ["PQ8"] and lead["over"] == second["codec"] and record["rough_lead_z"] == ps.ROUGH_LEAD_Z
    assert 0 < lead["by"] == pytest.approx(rows["PQ8"]["recall_at_10"] - second["recall_at_10"], abs=1e-4)
    assert lead["standard_errors"] > ps.ROUGH_LEAD_Z and lead["rows_per_centroid"][0] == 2_500 // 256
    assert lead["rows_per_parameter"][0] == 2.44  # (2,500 / (256 x 4))
    assert lead["rule"] == "rougher"
    text = _lead_text(record)
    assert "standard errors" in text and "judged the more roughly" in text and "more than 1.0" not in text
    # the same lead inside its noise: the best go on
    monkeypatch.setattr(ps, "ROUGH_LEAD_Z", lead["standard_errors"] + 0.5)
    kept, record, _ = ps.preselect(specs, xt, xq, max_bytes=8, **kw)
    assert kept[:2] == ["PQ8", second["codec"]] and "lead" not in record
    # a leader fitting fewer parameters than a rival: however far ahead, not settled within the margin
    monkeypatch.setattr(ps, "ROUGH_LEAD_Z", 0.0)
    kept, record, _ = ps.preselect(specs + ["SQ4"], xt, xq, max_bytes=16, **kw)
    rows = {r["codec"]: r for r in record["rows"]}
    assert kept[0] == "SQ4" and rows["SQ4"]["recall_at_10"] > rows["PQ8"]["recall_at_10"] and "PQ8" in kept
    kept, record, _ = ps.preselect(specs + ["RQ4x6"], xt, xq, max_bytes=8, **kw)
    rows = {r["codec"]: r for r in record["rows"]}
    assert rows["PQ8"]["recall_at_10"] > rows["RQ4x6"]["recall_at_10"] and kept[:2] == ["PQ8", "RQ4x6"]


def test_a_residual_quantizer_chosen_by_its_first_stages_is_trained_whole_by_the_run(corpus, tmp_path,
                                                                                       ray_executor, monkeypatch):
    """The first stage's pick judged by its first stages (not trained whole there): the run
    trains it whole, the manifest and the report say its first-stage recall is a floor."""
    from vecpress.pipeline.report import summary_table

    info = _run_auto(corpus, tmp_path, ray_executor, monkeypatch, ["PQ4", "RQ2x6", "PQ8x4fs", "BIN", "RQ4x6", "SQ4"],
                     LEAD_MARGIN=-1.0)  # (any lead: RQ2x6 ahead of the others)
    advisor = info["advisor"]
    assert advisor["chosen"] == info["codec"] == "RQ4x6" and advisor["decided_in"] == "first stage"
    assert advisor["recall_judged_by"] == "RQ2x6" and advisor["reason"].startswith("its first stages, RQ2x6, led")
    assert "at least as good" in advisor["reason"]
    assert "recall@10 at least" in summary_table(info)
    assert info["eval"]["recall_at_10"] >= advisor["chosen_recall_at_10"] - 0.1  # (the whole of it, over the corpus)


def test_a_residual_quantizer_that_goes_on_judged_by_its_first_stages_is_trained_whole_in_the_second(
        corpus, tmp_path, ray_executor, monkeypatch):
    """RQ8x6 goes on from the first stage judged by RQ4x6, its first stages (`_goes_on_as_it_is`,
    forced here), not trained whole there: the second stage trains and sweeps it whole, and the
    report says how the first stage judged it."""
    from vecpress.pipeline.report import summary_table

    def goes_on(rows, below, *_):  # (after RQ4x6: the next length projected 0.01 above it)
        return {"behind": "PQ4", "by": 0.01, "projected": rows[below]["recall_at_10"] + 0.01, "needs": 0.06,
                "gained": 0.02} if below == "RQ4x6" else None

    info = _run_auto(corpus, tmp_path, ray_executor, monkeypatch, ["PQ4", "RQ2x6", "RQ4x6", "RQ8x6", "SQ4"],
                     LEAD_MARGIN=1.0, ROUGH_LEAD_Z=float("inf"),  # (no lead settles: a second stage)
                     _goes_on_as_it_is=goes_on)
    advisor = info["advisor"]
    first = {r["codec"]: r for r in advisor["first_stage"]["rows"]}
    assert first["RQ8x6"]["judged_by"] == "RQ4x6" and "trained_on_from" not in first["RQ8x6"]
    assert first["RQ8x6"]["recall_at_10"] == first["RQ4x6"]["recall_at_10"]
    assert advisor["decided_in"] == "second stage" and "RQ8x6" in advisor["first_stage"]["kept"]
    assert not {"RQ2x6", "RQ4x6"} & set(advisor["first_stage"]["kept"])
    swept = {r["codec"]: r for r in advisor["table"]}
    assert swept["RQ8x6"]["train_seconds"] > 0 and swept["RQ8x6"]["code_bytes"] == 6
    projected = first["RQ8x6"]["projected_recall_at_10"]
    assert projected == first["RQ4x6"]["recall_at_10"] + 0.01
    assert f"RQ8x6 (judged there by RQ4x6, its next length projected at {projected:.3f} or more)" in summary_table(info)
    assert f"swept over {advisor['swept_rows']:,} rows" in summary_table(info)


def _run_auto(corpus, tmp_path, ray_executor, monkeypatch, grid: list[str], **preselect_names) -> dict:
    """`inspect_table` of a `--codec auto --max-bytes 16` run whose default grid is `grid`,
    its first stage on half the sample, with pipeline.preselect's names set as given."""
    from vecpress.pipeline import preselect, sweep

    monkeypatch.setattr(sweep, "default_grid", lambda *a, **k: grid)
    monkeypatch.setattr(preselect, "STAGE1_TRAIN_ROWS", COMMON["num_train"] // 2)
    for name, value in preselect_names.items():
        monkeypatch.setattr(preselect, name, value)
    root, _ = corpus
    out = str(tmp_path / "out")
    run_compress([str(root / "src")], out, "t", CompressOptions(codec="auto", metric="cosine", max_bytes=16, **COMMON),
                 executor=ray_executor)
    return inspect_table(out, "t")


def test_the_second_stage_trains_a_front_runner_on_the_rows_its_kind_of_codec_needs(corpus, tmp_path, ray_executor,
                                                                                   monkeypatch):
    """The second stage trains each front-runner on the rows past which its kind of codec
    comes out no better (preselect.second_stage_rows): residual quantizers on the whole sample,
    a product quantizer on PQ_ROWS_PER_PARAMETER rows per parameter of its k-means (raised
    here so that one falls between the first stage's rows and the sample's), and where the
    first stage's rows are as many, as the first stage trained it. A pick trained on fewer
    rows than the sample's is trained on them all by the train stage: the codec a run naming
    it commits, byte for byte."""
    from vecpress.kernels.codecs import build
    from vecpress.pipeline.report import summary_table

    monkeypatch.setattr(build, "PQ_ROWS_PER_PARAMETER", 16)  # (PQ4x4 at 32-d: 16 x 16 centroids x 8 dims)
    info = _run_auto(corpus, tmp_path, ray_executor, monkeypatch, ["PQ4x4", "PQ8x4fs", "SQ4", "RQ4x6"],
                     LEAD_MARGIN=1.0, ROUGH_LEAD_Z=float("inf"))  # (no lead settles: a second stage for all four)
    advisor, n, n1 = info["advisor"], COMMON["num_train"], COMMON["num_train"] // 2
    assert advisor["decided_in"] == "second stage" and len(advisor["table"]) == 4
    rows = {r["codec"]: r["train_rows"] for r in advisor["table"]}
    assert rows == {"PQ4x4": 2048, "PQ8x4fs": n1, "SQ4": n1, "RQ4x6": n}
    assert advisor["trained_on_fewer_rows"] == {s: r for s, r in rows.items() if r < n}
    assert f"PQ4x4 on 2,048 of the sample's {n:,} rows" in advisor["reason"]
    pick = advisor["chosen"]
    assert pick == "SQ4"  # (16 B against 2 to 4 here: the path where the train stage trains the pick again)
    assert advisor["pick_trained_here"] == (rows[pick] == n)
    assert info["codec"] == pick and (f"trained here on {rows[pick]:,} rows" in advisor["reason"]) == (rows[pick] < n)
    named = run_compress([str(corpus[0] / "src")], str(tmp_path / "named"), "t",
                         CompressOptions(codec=pick, metric="cosine", **COMMON), executor=ray_executor)
    assert info["codec_sha256"] == named.manifest["codec"]["sha256"]  # (the sample's every row, as a named run)
    swept = next(r for r in advisor["table"] if r["codec"] == pick)
    assert (swept["sha256"] == info["codec_sha256"]) == (rows[pick] == n)
    report = summary_table(info)
    assert "PQ4x4 (trained on 2,048 rows)" in report and "SQ4 (trained on 1,500 rows)" in report


@pytest.mark.parametrize(("spec", "dim", "sample", "rows"), [
    ("PQ64", 768, 100_000, 24_576),  # (8 per parameter of its k-means)
    ("PQ16x4fs", 768, 100_000, 10_000),  # (4,096 is all a 4-bit k-means takes: the first stage's training)
    ("SQ4", 768, 100_000, 10_000), ("BIN", 384, 100_000, 10_000),  # (per-dimension statistics)
    ("PQ8", 384, 100_000, 100_000),  # (65,536, all faiss's k-means takes of the whole sample: the same cost)
    ("RQ16x8,beam=1", 768, 100_000, 100_000), ("PCA64,RQ8x8,beam=1", 384, 30_000, 30_000),
    ("PQ64", 768, 20_000, 20_000),  # (at most the sample)
    ("PQ8", 128, 100_000, 32_768)])
def test_the_second_stage_trains_each_kind_of_codec_on_the_rows_past_which_it_comes_out_no_better(
        spec, dim, sample, rows):
    from vecpress.pipeline.preselect import second_stage_rows

    assert second_stage_rows(spec, dim, "cosine", 10_000, sample) == rows

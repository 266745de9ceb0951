"""Nightly runs read only what changed (pipeline/reuse.py): after an incremental run adds a
file, the old files' data pages are made unreadable (zeros; footers, sizes and so
fingerprints intact) and the next nights still succeed, with an evaluation equal to exact
search over every row and to a search of the stored codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_same_evaluation
from tests.pipeline.test_nightly import DIM, OPTS, part
from vecpress.kernels.knn import TopK, exact_knn, prepare_vectors
from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline.context import load_array
from vecpress.pipeline.evaluate import evaluate_version
from vecpress.pipeline.lists import version_lists
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.run import run_compress


def blind(path: Path) -> tuple[bytes, int]:
    """Zero every byte of a Parquet file but its magic and footer: any read of a page fails,
    while its size, footer and modification time (what tells a changed file) stay. Returns
    the original bytes and modification time."""
    data, mtime = path.read_bytes(), path.stat().st_mtime_ns
    footer = int.from_bytes(data[-8:-4], "little")
    rewrite(path, (data[:4] + bytes(len(data) - footer - 12) + data[-footer - 8:], mtime))
    return data, mtime


def rewrite(path: Path, content: tuple[bytes, int]) -> None:
    path.write_bytes(content[0])
    os.utime(path, ns=(content[1], content[1]))


def vectors(lo: int, hi: int) -> np.ndarray:
    """The rows of the 1,000-row files written by `part` from row lo to hi."""
    gen = ClusteredEmbeddings(DIM, seed=0, num_clusters=32)
    return np.concatenate([gen.batch(at, 1000) for at in range(lo, hi, 1000)])


def exact_truth(out: Path, manifest: dict, x: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k of the version's held-out queries over `x` (rows in table order),
    excluding each query's own row."""
    xq = load_array(str(out / manifest["sample"]["queries_uri"]))
    qpos = load_array(str(out / manifest["sample"]["query_positions_uri"]))
    top = TopK(len(xq), k, exclude=qpos)
    top.add(*exact_knn(prepare_vectors(xq, "l2"), x, k + 1, "l2"))
    return top.I


@pytest.mark.parametrize("partitions", [0, 8], ids=["codes", "partitioned"])
def test_incremental_runs_read_only_new_files(tmp_path, ray_executor, partitions):
    src, out = tmp_path / "src", tmp_path / "out"
    names = "abcde"
    for i, name in enumerate(names):
        part(src, f"{name}.parquet", i * 1000, (i + 1) * 1000)
    # batches of 500 rows: each 1,000-row file is a shard and a task of its own, so each is
    # recorded on its own (shards smaller than a batch are scanned, and recorded, together)
    opts = CompressOptions(**{**OPTS.__dict__, "partitions": partitions, "gate_max_drop": 1.0, "batch_size": 500})
    first = run_compress([str(src)], str(out), "t", opts, executor=ray_executor)
    assert first.mode == "full"

    part(src, "f.parquet", 5000, 6000)
    originals = {name: blind(src / f"{name}.parquet") for name in names}
    night = run_compress([str(src)], str(out), "t", opts, executor=ray_executor)
    assert night.mode == "incremental" and night.committed
    m = night.manifest
    assert m["sample"]["kept_rows"] == {"read": 0, "not_read": 5000}
    assert m["drift"]["measured"] and m["drift"]["recall_at_10"] > 0
    # the same held-out queries, and an exact ground truth over all 6,000 rows
    assert np.array_equal(load_array(str(out / m["sample"]["queries_uri"])),
                          load_array(str(out / first.manifest["sample"]["queries_uri"])))
    truth = load_array(str(out / m["sample"]["ground_truth_uri"]))
    assert np.array_equal(truth, exact_truth(out, m, vectors(0, 6000), truth.shape[1]))
    if partitions:  # every row listed once, kept rows from the previous lists
        lists = version_lists(str(out), m)
        listed = np.concatenate([lists.read(p)[0] for p in range(m["partitions"]["nlist"])])
        assert np.array_equal(np.sort(listed), np.arange(6000))

    # a night that only deletes a file: nothing is read from the others
    (src / "b.parquet").unlink()
    third = run_compress([str(src)], str(out), "t", opts, executor=ray_executor)
    assert third.mode == "incremental" and third.committed
    assert third.manifest["sample"]["kept_rows"] == {"read": 0, "not_read": 5000}
    assert not third.manifest["drift"]["measured"]
    rows = np.concatenate([vectors(0, 1000), vectors(2000, 6000)])  # table order: a, c, d, e, f
    truth = load_array(str(out / third.manifest["sample"]["ground_truth_uri"]))
    assert np.array_equal(truth, exact_truth(out, third.manifest, rows, truth.shape[1]))

    for name, content in originals.items():  # the files as they were (b for version 2), same fingerprints
        rewrite(src / f"{name}.parquet", content)
    for version, result in ((2, night), (3, third)):
        stored = evaluate_version(str(out), "t", version, ray_executor, recompute=True)
        assert_same_evaluation(result.eval, stored)
        if partitions:
            recall = [[(g["nprobes"], g["recall_at_10"]) for g in e["partitions"]["grid"]]
                      for e in (result.eval, stored)]
            assert recall[0] == recall[1]


def test_a_version_without_recorded_units_is_read_as_before(tmp_path, ray_executor):
    src, out = tmp_path / "src", tmp_path / "out"
    for i, name in enumerate("abc"):
        part(src, f"{name}.parquet", i * 1000, (i + 1) * 1000)
    opts = CompressOptions(**{**OPTS.__dict__, "gate_max_drop": 1.0})
    first = run_compress([str(src)], str(out), "t", opts, executor=ray_executor)
    (out / first.manifest["sample"]["units_uri"]).unlink()
    part(src, "d.parquet", 3000, 4000)
    night = run_compress([str(src)], str(out), "t", opts, executor=ray_executor)
    assert night.mode == "incremental" and night.manifest["sample"]["kept_rows"] == {"read": 3000, "not_read": 0}
    units = json.loads((out / night.manifest["sample"]["units_uri"]).read_text())
    assert sum(u["num_rows"] for u in units) == 4000  # recorded again, for the next night
    assert_same_evaluation(night.eval, evaluate_version(str(out), "t", night.version, ray_executor, recompute=True))


def test_units_recorded_under_another_ranking_are_searched_again(tmp_path, ray_executor):
    """A version recorded before cosine codes ranked by L2 (units without `scoring`): the next
    night reads its kept rows again rather than merge searches ranked otherwise, and records
    them with this ranking."""
    from vecpress.pipeline.reuse import SCORING

    src, out = tmp_path / "src", tmp_path / "out"
    for i, name in enumerate("abc"):
        part(src, f"{name}.parquet", i * 1000, (i + 1) * 1000)
    opts = CompressOptions(**{**OPTS.__dict__, "metric": "cosine", "gate_max_drop": 1.0, "batch_size": 500})
    first = run_compress([str(src)], str(out), "t", opts, executor=ray_executor)
    uri = out / first.manifest["sample"]["units_uri"]
    units = json.loads(uri.read_text())
    assert units and all(u["scoring"] == SCORING for u in units)
    uri.write_text(json.dumps([{k: v for k, v in u.items() if k != "scoring"} for u in units]))
    part(src, "d.parquet", 3000, 4000)
    night = run_compress([str(src)], str(out), "t", opts, executor=ray_executor)
    assert night.mode == "incremental" and night.manifest["sample"]["kept_rows"] == {"read": 3000, "not_read": 0}
    again = json.loads((out / night.manifest["sample"]["units_uri"]).read_text())
    assert sum(u["num_rows"] for u in again) == 4000 and all(u["scoring"] == SCORING for u in again)
    assert_same_evaluation(night.eval, evaluate_version(str(out), "t", night.version, ray_executor, recompute=True))

"""Shared fixtures: clustered Parquet corpora under tmp_path, one real local Ray per session,
Prefect's test harness (only for the tests that use it), and the real SIFT sample.

Tests mirror the code: tests/kernels, tests/pipeline (tests/pipeline/distributed), tests/flows,
and the repository-wide checks here (layers, packaging, docs, infra). `pytest` runs the fast
layer; `pytest --slow` adds the multi-node and long tests (what CI runs)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("LANCE_LOG", "error")
# credentials for the local S3-compatible test server (moto); set before Ray starts so that
# its workers inherit them
os.environ.setdefault("AWS_ACCESS_KEY_ID", "vecpress-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "vecpress-test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
warnings.filterwarnings("ignore", message=".*not fork-safe.*")
warnings.filterwarnings("ignore", message=".*fork support is experimental.*")

from vecpress.kernels.synthetic import ClusteredEmbeddings  # noqa: E402

SIFT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "sift5k"


def write_vectors(path, x: np.ndarray, ids=None, *, extra: dict | None = None, fixed: bool = True,
                  value_type=pa.float32(), row_group_size: int = 1000, column: str = "embedding") -> Path:
    """Write one Parquet file of vectors (fixed_size_list or list), ids and extra columns."""
    n, d = x.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else ids
    values = pa.array(x.ravel().astype(value_type.to_pandas_dtype()), type=value_type)
    vec = pa.FixedSizeListArray.from_arrays(values, d) if fixed else \
        pa.ListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)), values)
    cols = {"id": pa.array(ids), column: vec, **(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def write_split(folder, x: np.ndarray, bounds, name: str, row_group_size: int) -> None:
    """Rows x[bounds[i]:bounds[i+1]] as file `name.format(i)`.parquet in `folder`, with ids equal
    to the row numbers and a `text` column "doc <id>"."""
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        write_vectors(folder / f"{name.format(i)}.parquet", x[lo:hi], np.arange(lo, hi, dtype=np.int64),
                      extra={"text": pa.array([f"doc {j}" for j in range(lo, hi)])}, row_group_size=row_group_size)


@pytest.fixture
def make_corpus(tmp_path):
    """make_corpus(num_rows, dim, num_files, seed) -> (folder, all vectors in row order)."""

    def make(num_rows=6000, dim=32, num_files=3, seed=0, name="src", row_group_size=1000):
        gen = ClusteredEmbeddings(dim, seed=seed, num_clusters=64)
        x = gen.batch(0, num_rows)
        folder = tmp_path / name
        write_split(folder, x, np.linspace(0, num_rows, num_files + 1).astype(int), "part-{:03d}", row_group_size)
        return folder, x

    return make


@pytest.fixture(scope="session")
def ray_executor():
    """One real local Ray for the whole session (starting Ray takes 7-15 s here)."""
    from vecpress.pipeline.distributed import RayExecutor

    ex = RayExecutor(init_kwargs={"num_cpus": 2}).start()
    yield ex
    ex.shutdown()


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def sift5k():
    """(ids, vectors) of the real SIFT sample in ../shared/data/sift5k, or skip."""
    path = SIFT_DIR / "sift-dataset-5k.tsv"
    if not path.exists():
        pytest.skip(f"SIFT sample not found at {path}")
    data = np.loadtxt(path, delimiter="\t", dtype=np.float32)
    return data[:, -1].astype(np.int64), np.ascontiguousarray(data[:, :-1])


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (multi-node Ray clusters, GPU actor pools, a served "
                          "schedule: minutes); CI runs them")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where faiss sees a GPU (CI has none); tests marked `slow`
    only with --slow."""
    from vecpress.kernels._faiss import num_gpus

    skips = {}
    if num_gpus() == 0:
        skips["gpu"] = pytest.mark.skip(reason="faiss sees no GPU")
    if not config.getoption("--slow"):
        skips["slow"] = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


def assert_same_evaluation(in_pass: dict, stored: dict) -> None:
    """The evaluation found in the encode pass equals a search over the committed codes (ties
    between equal distances in different shards aside)."""
    assert in_pass["searched"] == "encode pass" and stored["searched"] == "stored codes"
    assert in_pass["rerank_from"] == stored["rerank_from"] and in_pass["num_queries"] == stored["num_queries"]
    assert in_pass["relative_error"] == pytest.approx(stored["relative_error"])
    for key in ("recall_at_1", "recall_at_10", "recall_at_100"):
        assert in_pass[key] == pytest.approx(stored[key], abs=0.005), key
    assert in_pass["rerank"].keys() == stored["rerank"].keys()
    for r, row in stored["rerank"].items():
        for key, value in row.items():
            assert in_pass["rerank"][r][key] == pytest.approx(value, abs=0.005), (r, key)

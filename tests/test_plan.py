"""Source planning and sampling: deterministic plans, fingerprints, uniform disjoint samples."""

from __future__ import annotations

import numpy as np

from pipeline.job import choose_positions
from pipeline.source import SourceSpec, plan_sources
from tests.conftest import write_vectors


def test_plan_is_deterministic_sorted_and_sharded(make_corpus):
    folder, _ = make_corpus(num_rows=6000, num_files=3, row_group_size=500)
    a = plan_sources(SourceSpec((str(folder),)), shard_rows=1200)
    b = plan_sources(SourceSpec((str(folder),)), shard_rows=1200)
    assert a.to_dict() == b.to_dict()
    assert [f.uri for f in a.files] == sorted(f.uri for f in a.files)
    assert a.vector_column == "embedding" and a.dim == 32 and a.num_rows == 6000
    # whole row groups, no shard over shard_rows, positions contiguous
    assert all(s.num_rows <= 1200 and s.num_rows % 500 == 0 for s in a.shards)
    assert [s.row_offset for s in a.shards] == list(np.cumsum([0] + [s.num_rows for s in a.shards[:-1]]))
    assert sum(s.num_rows for s in a.shards) == 6000


def test_fingerprint_changes_when_a_file_is_rewritten(make_corpus):
    folder, x = make_corpus(num_rows=3000, num_files=2)
    before = plan_sources(SourceSpec((str(folder),)))
    write_vectors(folder / "part-001.parquet", x[1500:] + 1.0, np.arange(1500, 3000))
    after = plan_sources(SourceSpec((str(folder),)))
    assert before.files[0].fingerprint == after.files[0].fingerprint
    assert before.files[1].fingerprint != after.files[1].fingerprint


def test_sample_is_uniform_seeded_and_disjoint():
    train, queries = choose_positions(1_000_000, 20_000, 1_000, seed=3)
    again = choose_positions(1_000_000, 20_000, 1_000, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(queries, again[1])
    assert len(np.intersect1d(train, queries)) == 0 and len(np.unique(train)) == 20_000
    # uniform over the whole range, not the first rows: every tenth holds about a tenth
    counts = np.bincount(train // 100_000, minlength=10)
    assert counts.min() > 1700 and counts.max() < 2300
    assert not np.array_equal(train, choose_positions(1_000_000, 20_000, 1_000, seed=4)[0])

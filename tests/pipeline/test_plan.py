"""Source planning and sampling: deterministic plans, fingerprints, uniform disjoint samples."""

from __future__ import annotations

import dataclasses

import numpy as np

from vecpress.pipeline.sampling import choose_positions, sample_subset
from vecpress.pipeline.source import SourceSpec, plan_sources
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


def test_small_files_share_shards_and_their_rows_read_in_order(tmp_path):
    """Shards are runs of row groups across the sorted files: 30 files of 150 rows make 5
    shards of up to 1000 rows (whole row groups of 50), not 30 shards; a shard reads its pieces
    in order, each batch within one file, at the positions the plan gives."""
    from vecpress.pipeline.parquet import iter_shard_batches
    from vecpress.pipeline.sampling import sample_rows
    from vecpress.pipeline.scan import Columns, scan_shard

    x = np.random.default_rng(1).standard_normal((4500, 8)).astype(np.float32)
    for i in range(30):
        write_vectors(tmp_path / f"f{i:02d}.parquet", x[i * 150:(i + 1) * 150], np.arange(i * 150, (i + 1) * 150),
                      row_group_size=50)
    plan = plan_sources(SourceSpec((str(tmp_path),)), shard_rows=1000)
    assert [s.num_rows for s in plan.shards] == [1000] * 4 + [500]
    for s in plan.shards:  # the files of its rows, a file's row groups split between two shards
        assert s.files == tuple(str(tmp_path / f"f{i:02d}.parquet") for i in
                                np.unique(np.arange(s.row_offset, s.row_offset + s.num_rows) // 150))
    for shard in plan.shards:
        ids = [(local, batch.column(1).to_numpy()) for _, local, _, batch, _ in
               iter_shard_batches(shard, ["embedding", "id"], 1000)]
        assert all(len(set(np.diff(i))) <= 1 for _, i in ids)  # no batch spans two files
        got = np.concatenate([i for _, i in ids])
        assert np.array_equal(got, np.arange(shard.row_offset, shard.row_offset + shard.num_rows))
        assert [local for local, _ in ids] == list(np.cumsum([0] + [len(i) for _, i in ids[:-1]]))
    batches = list(scan_shard(plan.shards[0], Columns.of(plan), [], batch_size=256, extra=("id",)))
    assert [len(b.x) for b in batches] == [256, 256, 256, 232]  # small files do not make small batches
    assert np.array_equal(np.concatenate([b.x for b in batches]), x[:1000])
    assert [b.position for b in batches] == [0, 256, 512, 768]
    for b in batches:  # each part of a batch is one file's, its ids where the plan puts them
        for p in b.parts:
            ids = p.record.column(1).to_numpy()
            assert np.array_equal(ids, np.arange(p.first_row, p.first_row + len(ids)) + int(p.piece.file_uri[-10:-8]) * 150)
            assert np.array_equal(ids, b.position + p.start + np.arange(len(ids)))
    shard = plan.shards[1]  # rows picked across its pieces come back as the plan says
    local = np.array([0, 1, 149, 400, 949])
    got = sample_rows((shard, local), columns=Columns.of(plan))
    assert np.array_equal(got, x[shard.row_offset + local])
    assert plan == type(plan).from_dict(plan.to_dict())


def test_a_layout_written_before_shards_spanned_files_still_reads():
    """Versions written when a shard was one file's row groups keep their plan.json: it reads
    as shards of one piece each (an incremental run extends them)."""
    from vecpress.pipeline.layout import SourcePlan

    old = {"vector_column": "embedding", "id_column": "id", "keep": ["text"], "dim": 8, "vector_type": "x",
           "value_type": "float32", "num_rows": 300, "fields_b64": "",
           "files": [{"uri": "/a.parquet", "size": 10, "fingerprint": "f", "num_rows": 300,
                      "row_group_rows": [100, 100, 100], "mtime_ns": None}],
           "shards": [{"index": 0, "file_uri": "/a.parquet", "fingerprint": "f", "row_group_start": 0,
                       "row_group_stop": 2, "num_rows": 200, "row_offset": 0, "file_row_start": 0},
                      {"index": 1, "file_uri": "/a.parquet", "fingerprint": "f", "row_group_start": 2,
                       "row_group_stop": 3, "num_rows": 100, "row_offset": 200, "file_row_start": 200}]}
    plan = SourcePlan.from_dict(old)
    assert [s.files for s in plan.shards] == [("/a.parquet",), ("/a.parquet",)]
    assert plan.shards[1].pieces[0].file_row_start == 200 and plan.row_group_rows() == [100, 100, 100]
    assert plan.keep == ("text",) and plan.shard_rows == 500_000


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


def test_a_subset_of_the_sample_is_spread_over_it_seeded_and_nested():
    """The advisor's subsets of the sample (its first stage's rows, the second stage's fewer
    rows): seeded, spread over the whole sample (which is in corpus order: its first rows are
    the first files'), a larger one holding every smaller one; another stream another order."""
    small, large = sample_subset(100_000, 10_000, seed=3), sample_subset(100_000, 12_288, seed=3)
    assert np.array_equal(small, sample_subset(100_000, 10_000, seed=3)) and np.all(np.diff(small) > 0)
    assert np.isin(small, large).all() and len(large) == 12_288
    counts = np.bincount(small // 10_000, minlength=10)  # (every tenth of the sample holds about a tenth)
    assert counts.min() > 850 and counts.max() < 1150
    assert not np.array_equal(small, sample_subset(100_000, 10_000, seed=4))
    assert not np.array_equal(sample_subset(100_000, 300, seed=3), sample_subset(100_000, 300, seed=3, stream=1))


def test_sample_within_a_row_group_budget_reads_at_most_that_many():
    """With more row groups than the budget, the sample comes from `max_row_groups` row groups
    chosen at random across the corpus, rows uniform over all of theirs."""
    sizes = [1000] * 900 + [500] * 200  # 1,000,000 rows in 1,100 row groups
    starts = np.concatenate([[0], np.cumsum(sizes)])
    kw = dict(row_group_rows=sizes, max_row_groups=100)
    train, queries = choose_positions(1_000_000, 20_000, 1_000, seed=3, **kw)
    again = choose_positions(1_000_000, 20_000, 1_000, seed=3, **kw)
    assert np.array_equal(train, again[0]) and np.array_equal(queries, again[1])
    assert len(np.intersect1d(train, queries)) == 0 and len(np.unique(train)) == 20_000
    groups = np.searchsorted(starts, np.concatenate([train, queries]), side="right") - 1
    assert len(np.unique(groups)) <= 100, "read at most the budget's row groups"
    assert len(np.unique(groups)) > 90, "and spread the sample over them"
    # the row groups span the corpus: every tenth of it holds some of them
    assert len(np.unique(np.concatenate([train, queries]) // 100_000)) == 10
    assert not np.array_equal(train, choose_positions(1_000_000, 20_000, 1_000, seed=4, **kw)[0])
    # about uniform: over many seeds, a row of a small row group is as likely as one of a big one
    per_row = np.zeros(len(sizes))
    for seed in range(40):
        t, _ = choose_positions(1_000_000, 2_000, 0, seed=seed, **kw)
        per_row += np.bincount(np.searchsorted(starts, t, side="right") - 1, minlength=len(sizes))
    per_row /= np.asarray(sizes)
    big, small = per_row[:900].mean(), per_row[900:].mean()
    assert abs(big / small - 1) < 0.15, (big, small)


def test_sample_avoids_excluded_rows_and_stays_uniform_over_the_rest():
    """`exclude` (the rows a kept codec was trained on): no sampled row is one of them, every
    other row stays equally likely, with or without a row-group budget, and without it the
    sample is the same as before; where too few rows are left, excluded ones fill in."""
    rng = np.random.default_rng(0)
    exclude = np.sort(rng.choice(10_000, 6_000, replace=False))
    plain = choose_positions(10_000, 0, 500, seed=1)
    assert np.array_equal(choose_positions(10_000, 0, 500, seed=1, exclude=[])[1], plain[1])
    sizes = [100] * 100
    for kw in ({}, {"row_group_rows": sizes, "max_row_groups": 20}):
        hits = np.zeros(10_000)
        for seed in range(200):  # (row groups come 20 at a time: many draws before the halves agree)
            train, queries = choose_positions(10_000, 200, 500, seed=seed, exclude=exclude, **kw)
            assert len(queries) == 500 and len(train) == 200 and not np.isin(np.concatenate([train, queries]), exclude).any()
            hits[queries] += 1
        rest = np.setdiff1d(np.arange(10_000), exclude)
        halves = hits[rest[: len(rest) // 2]].mean(), hits[rest[len(rest) // 2:]].mean()
        assert abs(halves[0] / halves[1] - 1) < 0.1, (kw, halves)
    _, queries = choose_positions(10_000, 0, 5_000, seed=2, exclude=exclude)  # 4,000 rows left
    assert len(queries) == 5_000 and np.isin(queries, exclude).sum() == 1_000


def test_row_group_budget_gives_way_to_the_sample_size():
    """A budget too small to hold the sample twice over is raised; with no more row groups
    than the (raised) budget, or budget 0, the sample is exactly the uniform one."""
    sizes = [1000] * 100
    uniform = choose_positions(100_000, 20_000, 1_000, seed=5)
    for budget in (0, 10, 100, 1000):  # 10 row groups hold 10,000 rows < 2 x 21,000: raised to 42 -> 100
        got = choose_positions(100_000, 20_000, 1_000, seed=5, row_group_rows=sizes, max_row_groups=budget)
        same = np.array_equal(got[0], uniform[0]) and np.array_equal(got[1], uniform[1])
        assert same == (budget in (0, 100, 1000)), budget
    train, queries = choose_positions(100_000, 2_000, 100, seed=5, row_group_rows=sizes, max_row_groups=10)
    starts = np.arange(0, 100_001, 1000)
    assert len(np.unique(np.searchsorted(starts, np.concatenate([train, queries]), side="right"))) <= 10


def test_row_groups_follow_the_layout_of_an_incremental_run(tmp_path):
    """An incremental run lays kept shards first: the sample's row-group sizes follow that
    order, not the files' (a new file sorting first made the budget read 12 row groups of 3)."""

    x = np.random.default_rng(0).standard_normal((4000, 8)).astype(np.float32)
    write_vectors(tmp_path / "a.parquet", x[:2000], np.arange(2000), row_group_size=1000)  # the new file
    write_vectors(tmp_path / "b.parquet", x[2000:], np.arange(2000, 4000), row_group_size=100)
    plan = plan_sources(SourceSpec((str(tmp_path),)), shard_rows=1000)
    assert plan.row_group_rows() == [1000] * 2 + [100] * 20
    kept_first = [s for s in plan.shards if s.files[0].endswith("b.parquet")] + \
                 [s for s in plan.shards if s.files[0].endswith("a.parquet")]
    layout = dataclasses.replace(plan, shards=tuple(kept_first))
    assert layout.row_group_rows() == [100] * 20 + [1000] * 2


def test_a_rewrite_that_keeps_the_footer_is_seen_by_its_modification_time(tmp_path):
    """Uncompressed pages and a value changed within its column's min/max leave size and footer
    as they were: the fingerprint alone missed the rewrite (stale codes kept)."""
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    x = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32)

    def write(values):
        vec = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 16)
        pq.write_table(pa.table({"id": pa.array(np.arange(1000)), "embedding": vec}), path, row_group_size=500,
                       compression="none", use_dictionary=False, write_statistics=False)

    write(x)
    before = plan_sources(SourceSpec((str(path),))).files[0]
    assert not before.changed_since(before) and before.mtime_ns is not None
    time.sleep(0.05)  # past the filesystem's timestamp granularity
    y = x.copy()
    y[10, 3] = (y[10, 3] + y[11, 3]) / 2
    write(y)
    after = plan_sources(SourceSpec((str(path),))).files[0]
    assert after.fingerprint == before.fingerprint  # what the footer cannot tell
    assert after.changed_since(before)
    # a layout written before vecpress recorded mtimes compares fingerprints only
    old = dataclasses.replace(before, mtime_ns=None)
    assert not after.changed_since(old)


def test_a_file_rewritten_after_planning_is_refused_not_mixed(make_corpus, tmp_path):
    """A file rewritten between planning and reading (e.g. between two attempts of one run's
    encode stage, whose finished shards are checkpointed) is refused by name; the shards of
    untouched files still read, and a checkpointed shard is not read again."""
    import pytest

    from vecpress.kernels.codecs.codec import Codec
    from vecpress.pipeline.codec_store import save_codec
    from vecpress.pipeline.errors import SourceChangedError
    from vecpress.pipeline.parquet import iter_shard_batches
    from vecpress.pipeline.sampling import sample_rows
    from vecpress.pipeline.scan import Columns, ComputeSpec
    from vecpress.pipeline.stages.s06_encode import EncodeJob, encode_shards

    folder, x = make_corpus(num_rows=3000, num_files=2)
    plan = plan_sources(SourceSpec((str(folder),)), shard_rows=1500)
    first, second = plan.shards[0], plan.shards[-1]
    assert first.files == (str(folder / "part-000.parquet"),) and second.files == (str(folder / "part-001.parquet"),)
    codec = save_codec(Codec.train(x, "PQ4", "l2", seed=0), str(tmp_path / "side"))
    job = EncodeJob(table_uri=str(tmp_path / "out.lance"), compute=ComputeSpec(codec, k=0), columns=Columns.of(plan),
                    checkpoint_uri=str(tmp_path / "shards"), device="cpu")
    done = encode_shards((first,), job=job)
    assert done.num_rows == first.num_rows

    # same rows, other values: the row counts still agree with the plan
    write_vectors(folder / "part-001.parquet", x[1500:] + 1.0, np.arange(1500, 3000))
    for read in (lambda: encode_shards((second,), job=job),
                 lambda: sample_rows((second, np.arange(3)), columns=Columns.of(plan)),
                 lambda: next(iter_shard_batches(second, ["embedding"], 100))):
        with pytest.raises(SourceChangedError, match=r"part-001\.parquet changed since it was planned"):
            read()
    again = encode_shards((first,), job=job)  # from its checkpoint
    assert again.fragments == done.fragments and again.seconds == done.seconds
    # an untouched file reads as before
    assert next(iter_shard_batches(first, ["embedding"], 100))[3].num_rows == 100


def test_a_part_of_the_corpus_is_stretches_spread_over_it_read_where_the_plan_puts_them(tmp_path):
    """spread_rows: about max_rows rows as whole row groups in up to 8 runs, one at the start
    of each eighth of the layout (so every stretch of files sorted by time is sampled), each run's
    rows at the global positions of the whole plan; the plan's own shards when it holds no
    more."""
    from vecpress.pipeline.layout import spread_rows
    from vecpress.pipeline.scan import Columns, scan_shard

    x = np.random.default_rng(2).standard_normal((9000, 8)).astype(np.float32)
    for i in range(6):  # 6 files of 1,500 rows in row groups of 100
        write_vectors(tmp_path / f"f{i}.parquet", x[i * 1500:(i + 1) * 1500], np.arange(i * 1500, (i + 1) * 1500),
                      row_group_size=100)
    plan = plan_sources(SourceSpec((str(tmp_path),)), shard_rows=4000)
    assert spread_rows(plan, 9000) == plan.shards
    part = spread_rows(plan, 2000)
    assert [s.num_rows for s in part] == [200, 300] * 4  # (20 row groups of 100 in 8 runs)
    starts = [s.row_offset for s in part]
    assert starts == [90 * i // 8 * 100 for i in range(8)]  # (the first row group of each eighth of 90)
    assert {u for s in part for u in s.files} == {str(tmp_path / f"f{i}.parquet") for i in range(6)}
    assert [s.num_rows for s in spread_rows(plan, 300)] == [100, 100, 100]  # (3 row groups: 3 runs)
    for shard in part:
        batches = list(scan_shard(shard, Columns.of(plan), [], batch_size=128, extra=("id",)))
        got = np.concatenate([b.x for b in batches])
        assert np.array_equal(got, x[shard.row_offset:shard.row_offset + shard.num_rows])
        assert [b.position for b in batches] == [shard.row_offset + i * 128 for i in range(len(batches))]

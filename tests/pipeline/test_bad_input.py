"""Bad input fails loudly and commits nothing.

Each end-to-end test first compresses a good corpus into version 1 of a table, then breaks the
source (a missing column, wrong-typed / null / non-finite vectors, mixed dimensions, unreadable
files, an output with another schema, an interrupted encode) and runs again into the same table.
The run must raise a typed error whose message names the file, the column, a row count and the
reason, and the table must still be at version 1 with the same rows and codes.

Row positions are chosen with the job's own seeded sampler (`choose_positions`), so a test knows
whether a bad row is read by the sample stage or only by the encode stage.
"""

from __future__ import annotations

import dataclasses

import re
from dataclasses import dataclass
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vecpress.pipeline.errors import ConfigError, OutputConflictError, SourceError
from vecpress.pipeline.executor import collect
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.sampling import choose_positions
from vecpress.pipeline.run import run_compress
from vecpress.pipeline.parquet import vectors_as_numpy

TABLE = "corpus"
NUM_ROWS, DIM, NUM_FILES = 3000, 32, 3
ROWS_PER_FILE = NUM_ROWS // NUM_FILES
# mode="full": each rerun rebuilds, so a bad file is read by the stage each test expects
OPTS = CompressOptions(codec="PQ8", num_train=2000, num_queries=50, eval_k=10, mode="full")
# what the plan stage derives from OPTS for NUM_ROWS rows (queries capped at 10% of rows)
NUM_QUERIES = min(OPTS.num_queries, NUM_ROWS // 10)
NUM_TRAIN = min(OPTS.num_train, NUM_ROWS - NUM_QUERIES)


def source(folder, **kw) -> tuple[list[str], dict]:
    """(inputs, column options) of a run over `folder`."""
    return [str(folder)], {"keep": ("text",), **kw}


def compress(spec: tuple[list[str], dict], out, opts: CompressOptions, executor):
    inputs, columns = spec
    return run_compress(inputs, str(out), TABLE, dataclasses.replace(opts, **columns), executor=executor)


def sampled_positions(num_rows: int = NUM_ROWS) -> np.ndarray:
    """Global row positions the sample stage reads for OPTS (train and queries)."""
    train, queries = choose_positions(num_rows, NUM_TRAIN, NUM_QUERIES, OPTS.seed)
    return np.union1d(train, queries)


def rows_of_file(file_index: int, *, sampled: bool, count: int) -> np.ndarray:
    """`count` file-local rows of part-<file_index> that the sample stage does (or does not) read."""
    lo = file_index * ROWS_PER_FILE
    local = np.arange(ROWS_PER_FILE)
    in_sample = np.isin(local + lo, sampled_positions())
    rows = local[in_sample == sampled]
    assert len(rows) >= 4 * count
    return rows[np.linspace(len(rows) // 4, 3 * len(rows) // 4, count).astype(int)]


def num_sampled_rows_of_file(file_index: int) -> int:
    lo = file_index * ROWS_PER_FILE
    return int(np.isin(np.arange(lo, lo + ROWS_PER_FILE), sampled_positions()).sum())


def write_part(path: Path, vectors: pa.Array, *, ids=None, text=True, vector_column="embedding",
               id_column="id", first_id: int = 0) -> Path:
    """One source file with the corpus layout (id, vector, text), any vector array."""
    n = len(vectors)
    cols = {id_column: pa.array(np.arange(first_id, first_id + n, dtype=np.int64)) if ids is None else ids,
            vector_column: vectors}
    if text:
        cols["text"] = pa.array([f"doc {j}" for j in range(first_id, first_id + n)])
    pq.write_table(pa.table(cols), path, row_group_size=1000)
    return path


def fixed(x: np.ndarray, value_type=pa.float32(), *, mask=None, value_mask=None) -> pa.FixedSizeListArray:
    values = pa.array(x.ravel().astype(value_type.to_pandas_dtype()), type=value_type,
                      mask=None if value_mask is None else value_mask.ravel())
    return pa.FixedSizeListArray.from_arrays(values, x.shape[1],
                                             mask=None if mask is None else pa.array(mask))


def ragged(rows: list[np.ndarray], value_type=pa.float32()) -> pa.ListArray:
    return pa.array([r.tolist() for r in rows], type=pa.list_(value_type))


def last_part(folder: Path) -> Path:
    return folder / f"part-{NUM_FILES - 1:03d}.parquet"


def message(excinfo) -> str:
    return str(excinfo.value)


def assert_mentions(msg: str, *parts: str) -> None:
    missing = [p for p in parts if p not in msg]
    assert not missing, f"message lacks {missing}:\n{msg}"


# ---- version 1 and the "nothing committed" check ----------------------------------------------

@dataclass
class Snapshot:
    uri: str
    version: int
    num_rows: int
    table: pa.Table


def snapshot(out: Path) -> Snapshot:
    uri = str(out / f"{TABLE}.lance")
    ds = lance.dataset(uri)
    return Snapshot(uri, ds.version, ds.count_rows(), ds.to_table())


def assert_unchanged(snap: Snapshot) -> None:
    """The failed run committed nothing: same latest version, rows and codes, and the old
    version still reads."""
    ds = lance.dataset(snap.uri)
    assert ds.version == snap.version
    assert [v["version"] for v in ds.versions()] == [snap.version]
    assert ds.count_rows() == snap.num_rows
    now = ds.to_table()
    assert now.equals(snap.table)
    old = lance.dataset(snap.uri, version=snap.version).to_table()
    assert old.column("code").equals(snap.table.column("code"))


@dataclass
class Base:
    folder: Path
    x: np.ndarray
    out: Path
    snap: Snapshot


@pytest.fixture
def base(make_corpus, ray_executor, tmp_path) -> Base:
    """A good 3 x 1000-row, 32-d corpus compressed into version 1 of TABLE."""
    folder, x = make_corpus(num_rows=NUM_ROWS, dim=DIM, num_files=NUM_FILES)
    out = tmp_path / "out"
    res = compress(source(folder), out, OPTS, ray_executor)
    assert res.version == 1
    snap = snapshot(out)
    assert snap.num_rows == NUM_ROWS
    return Base(folder, x, out, snap)


class SpyExecutor:
    """Delegates to another executor and records which stages ran."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[str] = []

    def imap(self, fn, items, *, desc, shared=None):
        self.calls.append(desc)
        return self.inner.imap(fn, items, desc=desc, shared=shared)

    def map(self, fn, items, *, desc, shared=None):
        return collect(self.imap(fn, items, desc=desc, shared=shared))


def rerun(base: Base, executor, spec: tuple[list[str], dict] | None = None, opts: CompressOptions = OPTS):
    return compress(spec or source(base.folder), base.out, opts, executor)


def fails_at_plan(base: Base, ray_executor, error=SourceError, spec=None, opts=OPTS) -> str:
    """Run again, expect `error` before any stage ran, and nothing committed; the message."""
    spy = SpyExecutor(ray_executor)
    with pytest.raises(error) as excinfo:
        rerun(base, spy, spec, opts)
    assert spy.calls == [], "the error should come from planning, before any data is read"
    assert_unchanged(base.snap)
    return message(excinfo)


def fails_in_stage(base: Base, executor, stage: str, spec=None) -> Exception:
    """Run again, expect an error raised in `stage` (sample or encode) and nothing committed;
    the error (its type is checked by the caller with `assert_typed`, after the message)."""
    spy = SpyExecutor(executor)
    with pytest.raises(Exception) as excinfo:
        rerun(base, spy, spec)
    assert spy.calls and spy.calls[-1] == stage, f"failed after stages {spy.calls}, expected in {stage}"
    assert_unchanged(base.snap)
    return excinfo.value


class UntypedError(AssertionError):
    """The run failed with the right message, but not as the typed error it should be."""


def assert_typed(exc: Exception, error=SourceError) -> None:
    if not isinstance(exc, error):
        raise UntypedError(f"expected {error.__name__}, got {type(exc).__name__}: {exc}")


@pytest.fixture
def ray_one(ray_executor):
    """The session's Ray with one task in flight, so a run expected to fail in a Ray stage
    fails on a known shard (the error is the same with more tasks in flight)."""
    from vecpress.pipeline.distributed import RayExecutor

    return RayExecutor(max_in_flight=1)


# ---- 1, 2: missing columns ------------------------------------------------------------------

@pytest.mark.parametrize("bad_name, vector_column", [
    ("part-999.parquet", None),         # sorts last: the vector column is picked from part-000
    ("a-first.parquet", "embedding"),   # sorts first: the column is named explicitly
])
def test_missing_vector_column(base, ray_executor, bad_name, vector_column):
    write_part(base.folder / bad_name, fixed(base.x[:700]), vector_column="vec")
    msg = fails_at_plan(base, ray_executor, spec=source(base.folder, vector_column=vector_column))
    assert_mentions(msg, bad_name, "'embedding'", "700 rows", "missing", "vector")
    for good in ("part-000", "part-001", "part-002"):
        assert good not in msg


@pytest.mark.parametrize("drop, role", [("id", "id"), ("text", "passthrough")])
def test_missing_id_or_passthrough_column(base, ray_executor, drop, role):
    part = last_part(base.folder)
    t = pq.read_table(part)
    pq.write_table(t.drop_columns([drop]), part)
    msg = fails_at_plan(base, ray_executor)
    assert_mentions(msg, part.name, f"'{drop}'", f"{ROWS_PER_FILE} rows", "missing", role)


@pytest.mark.parametrize("name", ["code", "rerank_code"])
def test_passthrough_column_with_a_reserved_name(base, ray_executor, name):
    for part in base.folder.glob("*.parquet"):
        pq.write_table(pq.read_table(part).rename_columns(["id", "embedding", name]), part)
    msg = fails_at_plan(base, ray_executor, spec=source(base.folder, keep=(name,)))
    assert_mentions(msg, f"'{name}'", "reserved")


# ---- 3: wrong-typed vectors -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["list<int32>", "string", "list<double>", "fixed_size_list<double>"])
def test_wrong_typed_vectors(base, ray_executor, kind):
    x = base.x[2 * ROWS_PER_FILE:]
    vectors = {
        "list<int32>": lambda: ragged(list((x * 100).astype(np.int32)), pa.int32()),
        "string": lambda: pa.array([",".join(map(str, r)) for r in x[:, :4]]),
        "list<double>": lambda: ragged(list(x.astype(np.float64)), pa.float64()),
        "fixed_size_list<double>": lambda: fixed(x, pa.float64()),
    }[kind]()
    part = write_part(last_part(base.folder), vectors, first_id=2 * ROWS_PER_FILE)
    msg = fails_at_plan(base, ray_executor, spec=source(base.folder, vector_column="embedding"))
    assert_mentions(msg, part.name, "'embedding'", f"{ROWS_PER_FILE} rows", kind, "float32", "float16")


@pytest.mark.parametrize("kind", ["list<double>", "fixed_size_list<double>"])
def test_wrong_typed_vectors_without_vector_column_named(base, ray_executor, kind):
    """With no --vector-column and no float-list column in the first file, the message names
    the file, its rows, and each list column with its type (it named the type only with
    --vector-column)."""
    for p in base.folder.glob("*.parquet"):
        p.unlink()
    x = base.x.astype(np.float64)
    write_part(base.folder / "part-000.parquet", ragged(list(x), pa.float64()) if kind == "list<double>" else
               fixed(x, pa.float64()))
    msg = fails_at_plan(base, ray_executor)
    assert_mentions(msg, "part-000.parquet", "no float vector column", f"{len(x)} rows", "'embedding'", kind,
                    "float32")


def test_id_column_of_wrong_type(base, ray_executor):
    part = last_part(base.folder)
    t = pq.read_table(part)
    t = t.set_column(0, "id", t.column("id").cast(pa.float64()))
    pq.write_table(t, part)
    msg = fails_at_plan(base, ray_executor)
    assert_mentions(msg, part.name, "'id'", f"{ROWS_PER_FILE} rows", "double", "int64")


def test_passthrough_column_of_another_type_in_one_file(base, ray_executor):
    part = last_part(base.folder)
    t = pq.read_table(part)
    t = t.set_column(2, "text", pa.array(np.arange(t.num_rows)))
    pq.write_table(t, part)
    msg = fails_at_plan(base, ray_executor)
    assert_mentions(msg, part.name, "'text'", f"{ROWS_PER_FILE} rows", "types differ", "part-000.parquet")


# ---- 4, 5: dimensions that differ across files or rows -----------------------------------------

def test_dimensions_differ_across_files(base, ray_executor):
    x16 = np.ascontiguousarray(base.x[2 * ROWS_PER_FILE:, :16])
    part = write_part(last_part(base.folder), fixed(x16), first_id=2 * ROWS_PER_FILE)
    msg = fails_at_plan(base, ray_executor)
    assert_mentions(msg, part.name, "'embedding'", f"{ROWS_PER_FILE} rows", "[16]", "[32]", "dimensions differ",
                    "part-000.parquet")


@pytest.mark.parametrize("how", ["variable lists", "non-null items named element"])
def test_vector_types_of_one_dimension_mix_across_files(base, ray_one, how):
    """Writers differ in how they declare the same vectors: fixed or variable lists, nullable
    or non-null items, "item" or "element". Each batch is converted on its own, so the run
    takes them all and gives the codes of the uniform corpus."""
    x = base.x[2 * ROWS_PER_FILE:]
    if how == "variable lists":
        vectors = ragged(list(x))
    else:
        item = pa.field("element", pa.float32(), nullable=False)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), type=pa.list_(item, DIM))
    write_part(last_part(base.folder), vectors, first_id=2 * ROWS_PER_FILE)
    rerun(base, ray_one)
    now = snapshot(base.out)
    assert now.version == base.snap.version + 1 and now.num_rows == NUM_ROWS
    assert now.table.column("code").equals(base.snap.table.column("code"))


def test_passthrough_nullable_in_a_later_file_only(base, ray_one):
    """The first file declares `text` non-null, a later one holds nulls: the output's field is
    nullable and keeps them (it was the first file's field alone)."""
    first = base.folder / "part-000.parquet"
    t = pq.read_table(first)
    pq.write_table(t.cast(t.schema.set(2, pa.field("text", pa.string(), nullable=False))), first)
    part = last_part(base.folder)
    t = pq.read_table(part)
    text = [None if j % 2 else f"doc {j}" for j in range(t.num_rows)]
    pq.write_table(t.set_column(2, "text", pa.array(text, pa.string())), part)
    rerun(base, ray_one)
    out = lance.dataset(base.snap.uri)
    assert out.schema.field("text").nullable
    assert out.to_table(columns=["text"]).column(0).null_count == ROWS_PER_FILE // 2


def write_list_corpus(folder: Path, x: np.ndarray) -> None:
    """The corpus again, as list<float> vectors (one dimension per row, not per type)."""
    folder.mkdir()
    for i in range(NUM_FILES):
        lo = i * ROWS_PER_FILE
        write_part(folder / f"part-{i:03d}.parquet", ragged(list(x[lo:lo + ROWS_PER_FILE])), first_id=lo)


@pytest.mark.parametrize("bad_dim", [31, 33])
def test_dimensions_differ_across_rows_found_by_encode(base, ray_one, tmp_path, bad_dim):
    """A list<float> row of another length is only seen while reading; rows outside the sample
    are first read by an encode task."""
    folder = tmp_path / "lists"
    write_list_corpus(folder, base.x)
    bad = rows_of_file(2, sampled=False, count=2)
    lo = 2 * ROWS_PER_FILE
    rows = list(base.x[lo:])
    for r in bad:
        rows[r] = np.resize(rows[r], bad_dim)
    part = write_part(last_part(folder), ragged(rows), first_id=lo)
    exc = fails_in_stage(base, ray_one, "encode", spec=source(folder))
    assert_mentions(str(exc), part.name, "'embedding'", f"2 of {ROWS_PER_FILE} rows", f"other than {DIM}",
                    f"first has {bad_dim}", f"first at row {bad[0]})")
    assert_typed(exc)


@pytest.mark.parametrize("kind", ["dimension", "null vectors", "NaN or Inf"])
def test_bad_rows_found_by_sample(base, ray_one, tmp_path, kind):
    lo = 2 * ROWS_PER_FILE
    bad = rows_of_file(2, sampled=True, count=3)
    if kind == "dimension":
        folder = tmp_path / "lists"
        write_list_corpus(folder, base.x)
        rows = list(base.x[lo:])
        for r in bad:
            rows[r] = rows[r][:20]
        vectors = ragged(rows)
    else:
        folder = base.folder
        x = base.x[lo:].copy()
        mask = np.zeros(ROWS_PER_FILE, bool)
        mask[bad] = True
        x[bad, 1] = np.nan
        vectors = fixed(x, mask=mask if kind == "null vectors" else None)
    part = write_part(last_part(folder), vectors, first_id=lo)
    exc = fails_in_stage(base, ray_one, "sample", spec=source(folder))
    msg = str(exc)
    assert_mentions(msg, part.name, "'embedding'", f"3 of {num_sampled_rows_of_file(2)} sampled rows", kind)
    assert_typed(exc)
    assert f"first at row {bad[0]})" in msg


# ---- 6, 11: nulls ----------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["null vectors", "null components"])
def test_null_vectors_and_components(base, ray_one, what):
    lo = 2 * ROWS_PER_FILE
    x = base.x[lo:]
    bad = rows_of_file(2, sampled=False, count=4)
    if what == "null vectors":
        mask = np.zeros(len(x), bool)
        mask[bad] = True
        vectors = fixed(x, mask=mask)
    else:
        value_mask = np.zeros(x.shape, bool)
        value_mask[bad, 5] = True
        vectors = fixed(x, value_mask=value_mask)
    part = write_part(last_part(base.folder), vectors, first_id=lo)
    exc = fails_in_stage(base, ray_one, "encode")
    assert_mentions(str(exc), part.name, "'embedding'", f"4 of {ROWS_PER_FILE} rows", what,
                    f"first at row {bad[0]})")
    assert_typed(exc)


def test_null_ids(base, ray_one):
    lo = 2 * ROWS_PER_FILE
    bad = rows_of_file(2, sampled=False, count=3)
    mask = np.zeros(ROWS_PER_FILE, bool)
    mask[bad] = True
    ids = pa.array(np.arange(lo, lo + ROWS_PER_FILE, dtype=np.int64), mask=mask)
    part = write_part(last_part(base.folder), fixed(base.x[lo:]), ids=ids, first_id=lo)
    exc = fails_in_stage(base, ray_one, "encode")
    assert_mentions(str(exc), part.name, "'id'", f"3 of {ROWS_PER_FILE} rows", "null id")
    assert_typed(exc)


# ---- 7: NaN / Inf ---------------------------------------------------------------------------

@pytest.mark.parametrize("values", [[np.nan], [np.inf], [np.nan, np.inf, -np.inf]], ids=["nan", "inf", "mixed"])
def test_non_finite_values_in_a_later_file_found_by_encode(base, ray_one, values):
    """Planted outside the sample, so the encode task of the last file reads them all in one
    batch (1000 rows < batch_size) and reports exactly how many rows are bad."""
    lo = 2 * ROWS_PER_FILE
    x = base.x[lo:].copy()
    bad = rows_of_file(2, sampled=False, count=5)
    for j, r in enumerate(bad):
        x[r, (7 * j) % DIM] = values[j % len(values)]
    part = write_part(last_part(base.folder), fixed(x), first_id=lo)
    exc = fails_in_stage(base, ray_one, "encode")
    assert_mentions(str(exc), part.name, "'embedding'", f"5 of {ROWS_PER_FILE} rows", "NaN or Inf",
                    f"first at row {bad[0]})")
    assert_typed(exc)


def test_non_finite_values_anywhere_fail_and_commit_nothing(base, ray_one):
    """Rows not chosen against the sample: whichever stage reads them first, the run fails
    with the file named, and commits nothing."""
    lo = 2 * ROWS_PER_FILE
    x = base.x[lo:].copy()
    x[100:110, 3] = np.nan
    x[500, 0] = np.inf
    part = write_part(last_part(base.folder), fixed(x), first_id=lo)
    with pytest.raises(Exception) as excinfo:
        rerun(base, ray_one)
    assert_mentions(message(excinfo), part.name, "'embedding'", "NaN or Inf", " rows ")
    assert_unchanged(base.snap)
    assert_typed(excinfo.value)


def test_float16_overflow_is_inf(base, ray_one, tmp_path):
    """float16 sources are converted exactly; a value that was written as inf stays bad."""
    folder = tmp_path / "half"
    folder.mkdir()
    for i in range(NUM_FILES):
        lo = i * ROWS_PER_FILE
        x = base.x[lo:lo + ROWS_PER_FILE].copy()
        if i == 1:
            x[rows_of_file(1, sampled=False, count=1), 0] = 1e6  # > float16 max -> inf
        write_part(folder / f"part-{i:03d}.parquet", fixed(x, pa.float16()), first_id=lo)
    exc = fails_in_stage(base, ray_one, "encode", spec=source(folder))
    assert_mentions(str(exc), "part-001.parquet", "'embedding'", f"1 of {ROWS_PER_FILE} rows", "NaN or Inf")
    assert_typed(exc)


# ---- 8: unreadable and truncated files -------------------------------------------------------

@pytest.mark.parametrize("how", ["truncated", "text", "empty"])
def test_unreadable_files_fail_at_plan(base, ray_executor, how):
    part = last_part(base.folder)
    if how == "truncated":
        data = part.read_bytes()
        part.write_bytes(data[:len(data) // 2])
        reason = "truncated"
    elif how == "text":
        part = base.folder / "x.parquet"
        part.write_text("id,embedding\n1,0.5\n")
        reason = "not a Parquet file"
    else:
        part.write_bytes(b"")
        reason = "0 bytes"
    msg = fails_at_plan(base, ray_executor)
    assert_mentions(msg, part.name, reason, "unreadable", f"1 of {len(list(base.folder.glob('*.parquet')))}")


def test_corrupt_data_pages_fail_while_reading(base, ray_one):
    """A valid footer over damaged column data passes planning; reading it must still fail with
    the file named, and commit nothing."""
    part = last_part(base.folder)
    data = bytearray(part.read_bytes())
    col = pq.ParquetFile(part).metadata.row_group(0).column(1)  # the embedding column chunk
    start = col.dictionary_page_offset or col.data_page_offset
    for i in range(start + 64, start + col.total_compressed_size - 64, 97):
        data[i] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(Exception) as excinfo:
        rerun(base, ray_one)
    assert_mentions(message(excinfo), part.name)
    assert_unchanged(base.snap)
    assert_typed(excinfo.value)


# ---- 9: an output that exists with another schema ------------------------------------------------

# with allow_schema_change a changed code width or column order/type must give a readable version 2
@pytest.mark.parametrize("change", [
    {"spec": dict(keep=())},
    {"opts": dict(codec="PQ16")},
    {"spec": dict(id_column="text", keep=("id",))},
], ids=["no-passthrough", "wider-codes", "id-type"])
def test_output_with_another_schema(base, ray_executor, ray_one, change):
    spec = source(base.folder, **change.get("spec", {}))
    opts = CompressOptions(**{**OPTS.__dict__, **change.get("opts", {})})
    msg = fails_at_plan(base, ray_executor, OutputConflictError, spec=spec, opts=opts)
    assert_mentions(msg, f"{TABLE}.lance", "another schema", f"{NUM_ROWS} rows", "code:", "--allow-schema-change")

    allowed = CompressOptions(**{**opts.__dict__, "allow_schema_change": True})
    res = rerun(base, ray_one, spec, allowed)
    assert res.version == 2
    ds = lance.dataset(base.snap.uri)
    assert ds.version == 2 and ds.count_rows() == NUM_ROWS
    t = ds.to_table()
    spec = dataclasses.replace(allowed, **spec[1])  # the run's options, columns included
    assert t.schema.names == [spec.id_column, "code", *spec.keep]
    assert t.schema.field("code").type.byte_width == (16 if opts.codec == "PQ16" else 8)
    by_id = dict(zip(t.column(spec.id_column).to_pylist(), range(t.num_rows)))
    expected_ids = [f"doc {i}" for i in range(NUM_ROWS)] if spec.id_column == "text" else list(range(NUM_ROWS))
    assert sorted(by_id) == sorted(expected_ids)
    if "id" in spec.keep:
        assert t.column("id").to_pylist()[by_id["doc 7"]] == 7
    # the old version is still there, as it was
    assert lance.dataset(base.snap.uri, version=1).to_table().equals(base.snap.table)


# ---- 10: a run interrupted mid-encode --------------------------------------------------------------

class InterruptedEncode:
    """Delegates every stage but encode; encode runs its first shard for real (writing
    uncommitted fragment files) and then is interrupted."""

    def __init__(self, inner):
        self.inner = inner
        self.written: set[str] = set()

    def imap(self, fn, items, *, desc, shared=None):
        if desc != "encode":
            return self.inner.imap(fn, items, desc=desc, shared=shared)
        items = list(items)
        r = fn(items[0], **(shared or {}))
        self.written |= {f["files"][0]["path"] for frags in r.fragments for f in frags}
        raise KeyboardInterrupt

    def map(self, fn, items, *, desc, shared=None):
        return collect(self.imap(fn, items, desc=desc, shared=shared))


def data_files(snap: Snapshot) -> set[str]:
    return {p.name for p in (Path(snap.uri) / "data").iterdir()}


def test_interrupted_encode_leaves_previous_version(base, ray_executor):
    before = data_files(base.snap)
    interrupted = InterruptedEncode(ray_executor)
    with pytest.raises(KeyboardInterrupt):
        rerun(base, interrupted)
    assert interrupted.written and not interrupted.written & before, "the first shard wrote no fragment files"
    assert data_files(base.snap) == before  # issue 17: the interrupted run removed the files it wrote
    assert_unchanged(base.snap)

    res = rerun(base, ray_executor)
    assert res.version == 2
    ds = lance.dataset(base.snap.uri)
    assert ds.version == 2
    assert ds.count_rows() == NUM_ROWS  # orphaned fragments are not part of the new version
    t = ds.to_table()
    assert sorted(t.column("id").to_pylist()) == list(range(NUM_ROWS))
    assert lance.dataset(base.snap.uri, version=1).to_table().equals(base.snap.table)


def test_failed_first_run_leaves_no_table(make_corpus, ray_one, tmp_path):
    """With no previous version, a run that fails in encode leaves no readable table behind."""
    folder, x = make_corpus(num_rows=NUM_ROWS, dim=DIM, num_files=NUM_FILES)
    bad = rows_of_file(2, sampled=False, count=2)
    lo = 2 * ROWS_PER_FILE
    y = x[lo:].copy()
    y[bad, 0] = np.nan
    part = write_part(last_part(folder), fixed(y), first_id=lo)
    out = tmp_path / "out"
    with pytest.raises(Exception) as excinfo:
        compress(source(folder), out, OPTS, ray_one)
    assert_mentions(message(excinfo), part.name, "'embedding'", f"2 of {ROWS_PER_FILE} rows", "NaN or Inf")
    assert not (out / f"{TABLE}.lance" / "_versions").exists()
    assert_typed(excinfo.value)


# ---- 12: impossible codec specs -----------------------------------------------------------------

@pytest.mark.parametrize("codec, expect", [
    ("PQ7", ["PQ7", "dim=32", "m must divide", "[2, 4, 8, 16, 32]"]),
    ("PQ8x12", ["PQ8x12", "4096 training vectors", f"only {NUM_TRAIN}"]),
    ("HNSW32", ["HNSW32", "not a standalone codec"]),
])
def test_impossible_codec_fails_before_reading_data(base, ray_executor, codec, expect):
    opts = CompressOptions(**{**OPTS.__dict__, "codec": codec})
    msg = fails_at_plan(base, ray_executor, ConfigError, opts=opts)
    assert_mentions(msg, *expect)


def test_an_index_spec_needs_the_lancedb_output():
    """IVF<n>,PQ<m> names a LanceDB index, which only a LanceDB-served table has."""
    with pytest.raises(ConfigError, match="IVF16,PQ8 names a LanceDB index: add --serve lancedb"):
        CompressOptions(**{**OPTS.__dict__, "codec": "IVF16,PQ8"})


# ---- vectors_as_numpy --------------------------------------------------------------------------

def convert(arr, dim=4, **kw):
    return vectors_as_numpy(arr, dim, where="f.parquet", column="v", **kw)


def test_sliced_fixed_size_list_returns_its_own_rows():
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    arr = fixed(x).slice(3, 5)
    np.testing.assert_array_equal(convert(arr), x[3:8])


def test_sliced_fixed_size_list_over_sliced_values():
    x = np.arange(48, dtype=np.float32).reshape(12, 4)
    values = pa.array(x.ravel()).slice(8)  # child array with its own offset
    arr = pa.FixedSizeListArray.from_arrays(values, 4).slice(2, 3)
    np.testing.assert_array_equal(convert(arr), x[4:7])


def test_sliced_fixed_size_list_skips_nulls_outside_the_slice():
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    mask = np.zeros(10, bool)
    mask[[1, 9]] = True
    np.testing.assert_array_equal(convert(fixed(x, mask=mask).slice(3, 5)), x[3:8])
    with pytest.raises(SourceError) as excinfo:
        convert(fixed(x, mask=mask).slice(5, 5), first_row=100)
    assert_mentions(message(excinfo), "f.parquet", "'v'", "1 of 5 rows", "null vectors", "first at row 104")


def test_list_float16_converts_exactly():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(6, 4)).astype(np.float16)
    arr = ragged(list(h), pa.float16())
    got = convert(arr)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, h.astype(np.float32))
    np.testing.assert_array_equal(convert(fixed(h, pa.float16())), h.astype(np.float32))


def test_sliced_list_array():
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    rows = list(x)
    rows[0] = rows[0][:2]  # a bad row outside the slice
    arr = ragged(rows).slice(2, 6)
    np.testing.assert_array_equal(convert(arr), x[2:8])
    large = pa.array([r.tolist() for r in rows], type=pa.large_list(pa.float32())).slice(1, 4)
    np.testing.assert_array_equal(convert(large), x[1:5])


def test_sliced_list_array_reports_rows_of_the_slice():
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    rows = list(x)
    rows[6] = np.append(rows[6], 1.0)
    arr = ragged(rows).slice(4, 5)
    with pytest.raises(SourceError) as excinfo:
        convert(arr, first_row=4)
    assert_mentions(message(excinfo), "1 of 5 rows", "other than 4", "first has 5", "first at row 6")


@pytest.mark.parametrize("bad, reason", [
    (pa.array([[1, 2, 3, 4]], type=pa.list_(pa.int32())), "list<int32>"),
    (pa.array([[1.0, 2.0, 3.0, 4.0]], type=pa.list_(pa.float64())), "list<double>"),
    (pa.array(["1,2,3,4"]), "string"),
])
def test_conversion_refuses_other_types(bad, reason):
    with pytest.raises(SourceError) as excinfo:
        convert(bad)
    assert_mentions(message(excinfo), "f.parquet", "'v'", "1 rows", reason, "float32/float16")


def test_conversion_refuses_wrong_fixed_dimension_and_non_finite():
    with pytest.raises(SourceError, match=r"dimension 3, expected 4 \(2 rows\)"):
        convert(fixed(np.zeros((2, 3), np.float32)))
    x = np.zeros((5, 4), np.float32)
    x[2, 1], x[4, 3] = np.nan, -np.inf
    with pytest.raises(SourceError, match=re.escape("2 of 5 rows contain NaN or Inf (first at row 12)")):
        convert(fixed(x), first_row=10)


# ---- a failing Ray task must surface as its error, not abort the driver ------------------------

RAY_FAILING_MAP = """
import sys, time
from vecpress.pipeline.distributed import RayExecutor
from vecpress.pipeline.errors import SourceError

def encode(i):
    time.sleep(0.05 * (i % 3))
    if i == 1:
        raise SourceError("part-001.parquet: column 'embedding': 1 of 1000 rows contain NaN or Inf")
    return i

ex = RayExecutor(init_kwargs={"num_cpus": 2}).start()
for attempt in range(60):
    try:
        ex.map(encode, range(6), desc="encode")
    except SourceError:
        pass
ex.shutdown()
print("all failures surfaced as SourceError")
"""


# Ray 2.60 aborts the driver when a task that is finishing is force-cancelled; RayExecutor.map
# never cancels. Racy when broken, so it is repeated; a subprocess, since an abort kills it.
@pytest.mark.slow
def test_failing_task_does_not_abort_the_driver(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "failing_map.py"
    script.write_text(RAY_FAILING_MAP)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    why = [line for line in proc.stderr.splitlines() if "Check failed" in line] or [proc.stderr[-2000:]]
    assert proc.returncode == 0, f"driver exited with {proc.returncode}: " + "\n".join(why)
    assert "all failures surfaced as SourceError" in proc.stdout

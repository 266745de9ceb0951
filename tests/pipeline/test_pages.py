"""Reading a few rows of the vector column straight from their Parquet pages (pages.py): the
same values Arrow decodes, for each layout writers produce; Arrow where it does not apply."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vecpress.pipeline import pages
from vecpress.pipeline.errors import SourceError
from vecpress.pipeline.parquet import read_vectors
from vecpress.pipeline.source import SourceSpec, plan_sources

N, D, RG = 3000, 24, 1000


def _vectors(dtype: str) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((N, D)).astype(dtype)
    x[:, :3] = np.round(x[:, :3])  # a few repeated values, so a dictionary stays in use
    return x


def _write(path, x: np.ndarray, *, fixed: bool, **options) -> None:
    values = pa.array(x.ravel())
    col = (pa.FixedSizeListArray.from_arrays(values, D) if fixed else
           pa.ListArray.from_arrays(pa.array(np.arange(0, x.size + 1, D, dtype=np.int32)), values))
    pq.write_table(pa.table({"id": np.arange(len(x)), "embedding": col}), path, row_group_size=RG,
                   data_page_size=4096, **options)  # small pages: rows straddle page boundaries


LAYOUTS = [dict(fixed=fixed, dtype=dtype, compression=comp, data_page_version=version, encoding=encoding)
           for fixed, dtype, comp, version, encoding in itertools.product(
               [True, False], ["float32", "float16"], ["snappy", "zstd", "gzip", "none", "brotli"], ["1.0", "2.0"],
               ["dictionary", "plain", "byte_stream_split"])
           if comp == "snappy" or (fixed and dtype == "float32")]


def _options(layout: dict) -> dict:
    enc = layout["encoding"]
    return dict(compression=layout["compression"], data_page_version=layout["data_page_version"],
                use_dictionary=enc == "dictionary", use_byte_stream_split=enc == "byte_stream_split")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda ly: "-".join(str(v) for v in ly.values()))
def test_rows_from_pages_equal_arrow(tmp_path, layout):
    x = _vectors(layout["dtype"])
    path = tmp_path / "v.parquet"
    _write(path, x, fixed=layout["fixed"], **_options(layout))
    md = pq.read_metadata(path)
    f = pa.OSFile(str(path))
    leaf = pages.leaf_index(md, "embedding")
    rng = np.random.default_rng(1)
    for rg in range(md.num_row_groups):
        rows = np.sort(rng.choice(RG, 9, replace=False))
        rows[-1] = RG - 1  # the last row of the group too
        chunk = pages.chunk_pages(f, md, rg, leaf, (str(path), tuple(layout.values())))
        assert len(chunk.pages) > 3
        got = pages.read_rows(f, chunk, rows, D)
        np.testing.assert_array_equal(got, x[rg * RG + rows].astype(np.float32))


def test_header_parser_reads_what_pyarrow_wrote(tmp_path):
    """The page map adds up to the footer's counts and sizes."""
    path = tmp_path / "v.parquet"
    _write(path, _vectors("float32"), fixed=True)
    md = pq.read_metadata(path)
    col = md.row_group(0).column(1)
    chunk = pages.chunk_pages(pa.OSFile(str(path)), md, 0, 1, ("map",))
    last = chunk.pages[-1]
    assert last.first_value + last.num_values == col.num_values == RG * D
    assert chunk.dictionary is not None and chunk.pages[0].encoding == 8
    assert last.offset + last.compressed == col.dictionary_page_offset + col.total_compressed_size


def test_unhandled_layouts_are_refused_by_the_page_reader(tmp_path):
    x = _vectors("float32")
    lz4 = tmp_path / "lz4.parquet"
    _write(lz4, x, fixed=True, compression="lz4")  # Hadoop-framed LZ4: not read from pages
    md = pq.read_metadata(lz4)
    with pytest.raises(pages.Unsupported, match="compression LZ4"):
        pages.chunk_pages(pa.OSFile(str(lz4)), md, 0, 1, ("lz4",))
    holes = tmp_path / "holes.parquet"
    values = pa.array(x.ravel()).to_pylist()
    values[5 * D + 3] = None  # one null component: rows no longer sit at row * dim
    col = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), D)
    pq.write_table(pa.table({"embedding": col}), holes, row_group_size=RG)
    md = pq.read_metadata(holes)
    f = pa.OSFile(str(holes))
    chunk = pages.chunk_pages(f, md, 0, 0, ("holes",))
    with pytest.raises(pages.Unsupported, match="null"):
        pages.read_rows(f, chunk, np.array([7]), D)


def _plan(folder):
    return plan_sources(SourceSpec((str(folder),)), shard_rows=10_000)


def test_read_vectors_uses_pages_and_falls_back_to_arrow(tmp_path):
    x = _vectors("float32")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write(tmp_path / "a" / "p.parquet", x, fixed=False)
    _write(tmp_path / "b" / "p.parquet", x, fixed=False, compression="lz4")
    rows = np.array([0, 5, 999, 1000, 2047, 2999])
    pages._cache.clear()
    for folder in ("a", "b"):  # rows in 3 row groups; b's LZ4 is read by Arrow, a's from pages
        shard = _plan(tmp_path / folder).shards[0]
        np.testing.assert_array_equal(read_vectors(shard, rows, "embedding", D), x[rows])
    assert len(pages._cache) == 3


def test_read_vectors_from_pages_still_refuses_bad_values(tmp_path):
    """Values read from pages are checked as Arrow's are: a NaN names the file and row."""
    x = _vectors("float32")
    x[1234, 7] = np.nan
    _write(tmp_path / "p.parquet", x, fixed=True)
    shard = _plan(tmp_path).shards[0]
    with pytest.raises(SourceError, match=r"p\.parquet: column 'embedding'.*NaN or Inf \(first at row 1234\)"):
        read_vectors(shard, np.array([3, 1234]), "embedding", D)

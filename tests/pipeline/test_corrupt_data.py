"""Corrupt or degenerate data, and an output that cannot be written (issue 17, items 5 and 6).

Each test starts from version 1 of a good table (test_bad_input's `base`), breaks something
(a data page damaged into other readable values, all-zero vectors under cosine, another
dimension, an altered codec file, a full disk) and runs again: a typed one-line error naming the
file, column or path and the reason, and the table still at version 1.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.pipeline import test_bad_input
from tests.pipeline.test_bad_input import (
    DIM, NUM_FILES, NUM_ROWS, OPTS, ROWS_PER_FILE, TABLE, SpyExecutor, assert_mentions, assert_unchanged, compress,
    fails_at_plan, fixed, last_part, num_sampled_rows_of_file, rerun, rows_of_file, snapshot, source, write_part)
from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline.codec_store import _load, load_codec
from vecpress.pipeline.context import manifest_codec
from vecpress.pipeline.errors import CorruptFileError, OutputConflictError, OutputWriteError, SourceError
from vecpress.pipeline.search import search

#: test_bad_input's fixtures: version 1 of a good table, and its Ray with one task in flight
base = test_bad_input.base
ray_one = test_bad_input.ray_one

#: rows per row group of a damaged file (its row groups then have numbers to name)
DAMAGED_ROW_GROUP = 250


def damage_a_value(path, x: np.ndarray, first_id: int, row: int, component: int, value: float = 1e6) -> None:
    """Write x as the corpus file `path`, plain (no compression, no dictionary: values are their
    bytes), then overwrite one value in its data page: the pages still decode, and the footer's
    statistics are those of the data written."""
    n = len(x)
    table = pa.table({"id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)), "embedding": fixed(x),
                      "text": pa.array([f"doc {j}" for j in range(first_id, first_id + n)])})
    pq.write_table(table, path, row_group_size=DAMAGED_ROW_GROUP, compression="NONE", use_dictionary=False)
    data = bytearray(path.read_bytes())
    chunk = pq.read_metadata(path).row_group(row // DAMAGED_ROW_GROUP).column(1)
    start, end = chunk.data_page_offset, chunk.data_page_offset + chunk.total_compressed_size
    needle = np.float32(x[row, component]).tobytes()
    at = data.find(needle, start, end)
    assert at >= 0 and data.find(needle, at + 1, end) < 0, "the value's bytes should occur once in its page"
    data[at:at + 4] = np.float32(value).tobytes()
    path.write_bytes(bytes(data))
    assert pq.read_table(path).column("embedding")[row].values[component].as_py() == value  # still readable


# ---- 6: values outside the row group's statistics -------------------------------------------------

@pytest.mark.parametrize("stage", ["sample", "encode"])
def test_values_outside_the_footer_statistics_are_refused(base, ray_one, stage):
    """A page whose values decode but lie outside its row group's min/max was accepted; the scan
    (and the sample's reads) compare each row group's decoded values with the footer's."""
    lo = 2 * ROWS_PER_FILE
    row = int(rows_of_file(2, sampled=stage == "sample", count=1)[0])
    part = last_part(base.folder)
    damage_a_value(part, base.x[lo:], lo, row, component=3)
    spy = SpyExecutor(ray_one)
    with pytest.raises(SourceError) as excinfo:
        rerun(base, spy)
    assert spy.calls[-1] == stage
    assert_mentions(str(excinfo.value), part.name, "'embedding'", f"row group {row // DAMAGED_ROW_GROUP}:",
                    "value 1e+06", f"(row {row})", "outside the footer's statistics", "[min ", "damaged")
    assert "\n" not in str(excinfo.value)
    assert_unchanged(base.snap)


def test_footer_statistics_are_read_where_the_footer_has_them(tmp_path):
    """float32 and float16 statistics per row group (float16 ones are 2 bytes), of fixed and
    variable lists; none without them."""
    from tests.pipeline.test_bad_input import ragged
    from vecpress.pipeline.parquet import value_bounds

    x = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    for value_type, vectors in ((pa.float32(), fixed), (pa.float16(), fixed), (pa.float32(), ragged)):
        path = tmp_path / f"{value_type}.parquet"
        arr = vectors(x, value_type) if vectors is fixed else ragged(list(x), value_type)
        pq.write_table(pa.table({"v": arr}), path, row_group_size=200)
        bounds = value_bounds(pq.read_metadata(path), "v", range(1, 3))
        y = x.astype(value_type.to_pandas_dtype())
        assert bounds.first_group == 1 and bounds.starts.tolist() == [200, 400, 600]
        assert bounds.low.tolist() == [float(y[200:400].min()), float(y[400:].min())]
        assert bounds.high.tolist() == [float(y[200:400].max()), float(y[400:].max())]
    pq.write_table(pa.table({"v": fixed(x)}), tmp_path / "none.parquet", write_statistics=False)
    assert value_bounds(pq.read_metadata(tmp_path / "none.parquet"), "v", range(1)) is None


# ---- 6: all-zero vectors under cosine ----------------------------------------------------------

@pytest.mark.parametrize("stage", ["sample", "encode"])
def test_all_zero_vectors_are_refused_under_cosine(base, ray_one, stage):
    """Cosine divides by the norm: all-zero vectors were normalised silently (left at zero)."""
    lo = 2 * ROWS_PER_FILE
    x = base.x[lo:].copy()
    bad = rows_of_file(2, sampled=stage == "sample", count=3)
    x[bad] = 0
    part = write_part(last_part(base.folder), fixed(x), first_id=lo)
    spy = SpyExecutor(ray_one)
    with pytest.raises(SourceError) as excinfo:
        rerun(base, spy, opts=dataclasses.replace(OPTS, metric="cosine"))
    assert spy.calls[-1] == stage
    of = f"3 of {ROWS_PER_FILE} rows" if stage == "encode" else f"3 of {num_sampled_rows_of_file(2)} sampled rows"
    assert_mentions(str(excinfo.value), part.name, "'embedding'", of, "all-zero vectors", "cosine",
                    f"first at row {bad[0]})")
    assert_unchanged(base.snap)
    if stage == "encode":  # other metrics take them
        assert rerun(base, ray_one).version == 2


# ---- 6: another dimension than the table's -------------------------------------------------------

@pytest.mark.parametrize("codec", ["PQ8", None], ids=["same-code-size", "default-codec"])
def test_another_dimension_than_the_table_is_found_in_planning(base, ray_executor, tmp_path, codec):
    """PQ8 codes of 48-d vectors have the schema of the table's 32-d ones (a run replaced it
    silently), and the default codec's wider codes gave a generic schema conflict."""
    folder = tmp_path / "wide"
    folder.mkdir()
    write_part(folder / "part-000.parquet", fixed(ClusteredEmbeddings(48, seed=1).batch(0, NUM_ROWS)))
    opts = dataclasses.replace(OPTS, codec=codec, mode="auto")
    msg = fails_at_plan(base, ray_executor, OutputConflictError, spec=source(folder), opts=opts)
    assert_mentions(msg, f"{TABLE}.lance", "dimension 48, table has 32", "'embedding'", f"{NUM_ROWS} rows",
                    "--allow-schema-change")


# ---- 5: an altered codec file --------------------------------------------------------------------

def test_an_altered_codec_file_is_named(base, ray_one):
    codec_file = next((base.out / "_vecpress" / TABLE / "codecs").glob("*.faiss"))
    data = bytearray(codec_file.read_bytes())
    data[100] ^= 0xFF
    codec_file.write_bytes(bytes(data))
    _load.cache_clear()  # (this process loaded it while training: a fresh one reads the file)
    with pytest.raises(CorruptFileError) as excinfo:
        search(str(base.out), TABLE, base.x[:3], 5)
    assert_mentions(str(excinfo.value), str(codec_file), "PQ8", "does not match its checksum", "altered or damaged")
    # an incremental run measures the kept codec first: it fails the same way, committing nothing
    write_part(base.folder / "part-new.parquet", fixed(base.x[:100]), first_id=NUM_ROWS)
    with pytest.raises(CorruptFileError, match=str(codec_file)):
        rerun(base, ray_one, opts=dataclasses.replace(OPTS, mode="auto"))
    assert_unchanged(base.snap)
    codec_file.unlink()
    _load.cache_clear()
    with pytest.raises(CorruptFileError, match="cannot read the trained codec PQ8"):
        search(str(base.out), TABLE, base.x[:3], 5)
    # a full rebuild trains a codec anew, and can be searched
    res = rerun(base, ray_one)
    assert res.version == 2
    load_codec(manifest_codec(str(base.out), res.manifest["codec"]))


def test_a_damaged_copy_of_a_codec_is_replaced_when_saved(base, ray_one):
    """A rebuild that trains the same codec (same data, same seed) found its file there and
    kept the damaged copy."""
    codec_file = next((base.out / "_vecpress" / TABLE / "codecs").glob("*.faiss"))
    good = codec_file.read_bytes()
    codec_file.write_bytes(good[:-8] + b"\0" * 8)
    _load.cache_clear()
    res = rerun(base, ray_one)
    if res.manifest["codec"]["uri"] != str(codec_file.relative_to(base.out)):
        pytest.skip("training gave another codec this time")
    assert codec_file.read_bytes() == good
    assert len(search(str(base.out), TABLE, base.x[:3], 5, version=1)) == 15  # version 1 reads again


# ---- 5: a full disk ------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs folder of `size` under tmp_path (root only: `mount`), unmounted afterwards."""
    mounted = []

    def mount(name: str, size: str):
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # (a failed test's traceback may hold a file)


def fill(folder, leave: int):
    """A file filling the file system of `folder` up to `leave` free bytes."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_a_full_disk_under_the_sample_corpus_is_named(tmpfs):
    from vecpress.pipeline.demo import write_corpus

    disk = tmpfs("disk", "256k")
    with pytest.raises(OutputWriteError) as excinfo:
        write_corpus(str(disk / "corpus"), num_rows=4000, dim=32, num_files=2)
    assert str(excinfo.value) == f"{disk / 'corpus'}: cannot write the sample corpus: no space left on device"
    assert not list((disk / "corpus").glob("*.parquet")), "a half-written file would join the corpus"


def test_lance_errors_of_a_full_disk_are_recognised(tmpfs):
    """Lance's writer reports a full disk as an OSError/RuntimeError whose text holds the errno
    ("... (os error 28)"); `storage.writing` (around the fragment writes, the commit, the index
    and the eval table) names the path instead."""
    import lance

    from vecpress.pipeline import storage

    disk = tmpfs("disk", "256k")
    table = pa.table({"v": fixed(np.random.default_rng(0).standard_normal((4000, 32)).astype(np.float32))})
    uri = str(disk / "t.lance")
    with pytest.raises(OutputWriteError) as excinfo:
        with storage.writing(uri, "the new version's data files"):
            lance.fragment.write_fragments(table, uri, schema=table.schema, mode="overwrite")
    assert str(excinfo.value) == f"{uri}: cannot write the new version's data files: no space left on device"


@pytest.mark.parametrize("free", [0, 64 << 10], ids=["full", "64k"])
def test_a_full_disk_is_named_and_commits_nothing(make_corpus, ray_one, tmpfs, free):
    """Disk full was a traceback naming no path (OSError from numpy's save, Lance's writer...):
    here the lease (nothing free) and the run's sample (64 KiB free)."""
    folder, _ = make_corpus(num_rows=NUM_ROWS, dim=DIM, num_files=NUM_FILES)
    disk = tmpfs("disk", "4m")
    out = disk / "out"
    assert compress(source(folder), out, OPTS, ray_one).version == 1
    snap = snapshot(out)
    filler = fill(disk, free)
    with pytest.raises(OutputWriteError) as excinfo:
        compress(source(folder), out, OPTS, ray_one)
    msg = str(excinfo.value)
    assert msg.startswith(str(out) + "/") and msg.endswith(": no space left on device") and "\n" not in msg
    assert_unchanged(snap)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], "temporary files left behind"
    filler.unlink()
    assert compress(source(folder), out, OPTS, ray_one).version == 2

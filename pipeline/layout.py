"""A run's layout: the source files it read, and how their rows are cut into shards.

Rows are numbered across the sorted files (a row's *position*), and a version of the output
holds them in that order. A shard is a run of consecutive row groups of about `shard_rows`
rows, the unit of parallel work, of retry and of an incremental run's reuse; it may span files
(small files share shards), each file's part of it being a `Piece`. `pack_shards` cuts runs of
row groups into shards, for a full plan and for what an incremental run encodes anew: a
file of at least half a shard has shards of its own, smaller files share them.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class SourceFile:
    uri: str
    size: int
    #: sha256 of the file size and its Parquet footer: changes when the file is rewritten with
    #: other data, except where a rewrite keeps every page's size and statistics (uncompressed
    #: pages, values changed within their min/max): mtime_ns covers that
    fingerprint: str
    num_rows: int
    row_group_rows: tuple[int, ...]
    #: the file's modification time (ns) as its filesystem or object store reports it, or None
    #: (unknown, or a layout written before vecpress recorded it)
    mtime_ns: int | None = None

    def changed_since(self, old: "SourceFile") -> bool:
        """Whether this file differs from `old` (the same URI in an earlier layout)."""
        if self.fingerprint != old.fingerprint:
            return True
        return self.mtime_ns is not None and old.mtime_ns is not None and self.mtime_ns != old.mtime_ns


@dataclass(frozen=True)
class Piece:
    """Consecutive row groups of one file: a shard's part of that file."""

    file_uri: str
    #: the file's fingerprint when planned: a reader refuses the file if it changed since
    fingerprint: str
    row_group_start: int
    row_group_stop: int
    num_rows: int
    #: row index, inside its file, of the piece's first row
    file_row_start: int

    def describe(self) -> str:
        return (f"{self.file_uri} (row groups {self.row_group_start}..{self.row_group_stop - 1}, "
                f"{self.num_rows} rows)")


@dataclass(frozen=True)
class Shard:
    """About `shard_rows` consecutive rows (whole row groups, of one or more files)."""

    index: int
    pieces: tuple[Piece, ...]
    num_rows: int
    #: global position of the shard's first row
    row_offset: int

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.file_uri for p in self.pieces))

    @property
    def piece_starts(self) -> np.ndarray:
        """Each piece's first row within the shard."""
        return np.concatenate([[0], np.cumsum([p.num_rows for p in self.pieces])[:-1]]).astype(np.int64)

    def locate(self, local_rows: np.ndarray) -> list[tuple[Piece, np.ndarray, np.ndarray]]:
        """Sorted shard-local rows by piece: [(piece, indexes into local_rows, rows within the
        piece)]."""
        return _by_start(self.pieces, self.piece_starts, local_rows)

    def describe(self) -> str:
        if len(self.pieces) == 1:
            return self.pieces[0].describe()
        return f"shard {self.index} ({len(self.pieces)} pieces of {len(self.files)} files, {self.num_rows} rows)"

    @classmethod
    def from_dict(cls, d: dict) -> "Shard":
        if "pieces" not in d:  # a layout written when a shard was one file's row groups
            piece = Piece(d["file_uri"], d["fingerprint"], d["row_group_start"], d["row_group_stop"], d["num_rows"],
                          d["file_row_start"])
            return cls(d["index"], (piece,), d["num_rows"], d["row_offset"])
        return cls(d["index"], tuple(Piece(**p) for p in d["pieces"]), d["num_rows"], d["row_offset"])


@dataclass(frozen=True)
class SourcePlan:
    """The deterministic plan of a run: sorted files with sizes and fingerprints, and shards."""

    vector_column: str
    id_column: str
    keep: tuple[str, ...]
    dim: int
    vector_type: str  # e.g. "fixed_size_list<float32>[384]"
    value_type: str  # float32 | float16
    num_rows: int
    files: tuple[SourceFile, ...]
    shards: tuple[Shard, ...]
    #: id + passthrough fields as a serialized Arrow schema (base64)
    fields_b64: str = field(repr=False, default="")
    #: the shard size the layout was cut to (an incremental run packs its new shards to it)
    shard_rows: int = 500_000
    #: (link as found, real file read) for each file read through a symbolic link (--follow-links)
    links: tuple[tuple[str, str], ...] = ()
    #: (path not read, file read instead): a real file the listing reached a second time
    aliases: tuple[tuple[str, str], ...] = ()

    @property
    def source_bytes_per_vector(self) -> int:
        return self.dim * (4 if self.value_type == "float32" else 2)

    @property
    def output_fields(self) -> pa.Schema:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.fields_b64)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SourcePlan":
        d = dict(d)
        d["keep"] = tuple(d["keep"])
        d["files"] = tuple(SourceFile(**{**f, "row_group_rows": tuple(f["row_group_rows"])}) for f in d["files"])
        d["shards"] = tuple(Shard.from_dict(s) for s in d["shards"])
        for name in ("links", "aliases"):
            d[name] = tuple(tuple(pair) for pair in d.get(name, ()))
        return cls(**d)

    def locate(self, positions: np.ndarray) -> list[tuple[Shard, np.ndarray, np.ndarray]]:
        """Group sorted global row positions by shard: [(shard, indexes into positions, local rows)]."""
        return _by_start(self.shards, np.array([s.row_offset for s in self.shards], np.int64), positions)

    def row_group_rows(self) -> list[int]:
        """Rows of every row group of the layout, in position order (an incremental run's
        layout, kept shards first, takes them in its own order)."""
        files = {f.uri: f for f in self.files}
        return [r for s in self.shards for p in s.pieces
                for r in files[p.file_uri].row_group_rows[p.row_group_start:p.row_group_stop]]


def _by_start(parts: tuple, starts: np.ndarray, rows) -> list[tuple[object, np.ndarray, np.ndarray]]:
    """Sorted rows grouped by the part (piece, shard) whose first row `starts` holds: [(part,
    indexes into rows, rows counted from the part's first)]."""
    rows = np.asarray(rows, np.int64)
    which = np.searchsorted(starts, rows, side="right") - 1
    out = []
    for i in np.unique(which):
        sel = np.nonzero(which == i)[0]
        out.append((parts[int(i)], sel, rows[sel] - starts[i]))
    return out


def pack_shards(runs: Iterable[tuple[SourceFile, int, int]], shard_rows: int, *, first_index: int = 0,
                row_offset: int = 0) -> list[Shard]:
    """Cut runs of row groups `(file, first row group, stop)`, in the given order, into shards
    of about `shard_rows` rows: whole row groups, a shard closed when the next row group would
    take it past `shard_rows` (a row group larger than that is a shard of its own).

    A file of at least half a shard (`shard_rows // 2` rows) has shards of its own, so an
    incremental run that finds it unchanged keeps them whatever happens to other files.
    Smaller files share shards, so a corpus of many small files still makes few shards (at
    the price of encoding a shard's other small files again when one of them changes)."""
    shards: list[Shard] = []
    pieces: list[Piece] = []
    rows = 0

    def close():
        nonlocal pieces, rows, row_offset
        if rows:
            shards.append(Shard(first_index + len(shards), tuple(pieces), rows, row_offset))
            row_offset += rows
        pieces, rows = [], 0

    for f, start, stop in runs:
        alone = f.num_rows >= shard_rows // 2
        if alone:
            close()
        file_row = sum(f.row_group_rows[:start])
        for rg in range(start, stop):
            n = f.row_group_rows[rg]
            if rows and rows + n > shard_rows:
                close()
            _add_row_group(pieces, f, rg, n, file_row)
            rows += n
            file_row += n
        if alone:
            close()
    close()
    return shards


def _add_row_group(pieces: list[Piece], f: SourceFile, rg: int, n: int, file_row: int) -> None:
    """Row group `rg` of `f` (n rows from `file_row`) appended to `pieces`: the last piece
    grown when it ends just before it, else a new piece."""
    last = pieces[-1] if pieces else None
    if last is not None and last.file_uri == f.uri and last.row_group_stop == rg:
        pieces[-1] = Piece(f.uri, f.fingerprint, last.row_group_start, rg + 1, last.num_rows + n, last.file_row_start)
    else:
        pieces.append(Piece(f.uri, f.fingerprint, rg, rg + 1, n, file_row))


def shared_shard(shard: Shard, files: dict[str, SourceFile], shard_rows: int) -> bool:
    """Whether a shard holds small files only (pack_shards packs those together)."""
    return all(files[p.file_uri].num_rows < shard_rows // 2 for p in shard.pieces)


def group_shards(shards: Iterable[Shard], min_rows: int) -> list[tuple[Shard, ...]]:
    """Consecutive shards smaller than `min_rows` in groups of about that many rows (shards
    whose rows do not follow on, as spread_rows's, are not grouped); a shard that large is a
    group of its own. A group is the work of one task: a scan's per-batch
    costs (the evaluation's top-k of every held-out query) do not depend on a batch's rows,
    so shards smaller than a batch (a small --shard-rows) are scanned together, not one by
    one (and a group of small shards can be held in memory)."""
    groups: list[tuple[Shard, ...]] = []
    current: list[Shard] = []
    rows = 0
    for shard in shards:
        if current and current[-1].row_offset + current[-1].num_rows != shard.row_offset:
            groups.append(tuple(current))
            current, rows = [], 0
        if shard.num_rows >= min_rows:
            if current:
                groups.append(tuple(current))
                current, rows = [], 0
            groups.append((shard,))
            continue
        current.append(shard)
        rows += shard.num_rows
        if rows >= min_rows:
            groups.append(tuple(current))
            current, rows = [], 0
    if current:
        groups.append(tuple(current))
    return groups


def merge_shards(group: tuple[Shard, ...]) -> Shard:
    """Consecutive shards as one run of rows (their pieces in order), for scanning them together."""
    first = group[0]
    if len(group) == 1:
        return first
    assert all(a.row_offset + a.num_rows == b.row_offset for a, b in zip(group, group[1:])), "shards not consecutive"
    return Shard(first.index, tuple(p for s in group for p in s.pieces), sum(s.num_rows for s in group),
                 first.row_offset)


def spread_rows(plan: SourcePlan, max_rows: int, runs: int = 8) -> tuple[Shard, ...]:
    """About `max_rows` of the plan's rows as whole row groups: as many row groups as hold that
    many rows on average, in up to `runs` shards of consecutive rows, each the first row groups
    of its stretch of the layout, the stretches spread evenly over it (so files sorted by time
    or topic are each sampled). The plan's own shards when it holds no more."""
    if plan.num_rows <= max_rows:
        return plan.shards
    files = {f.uri: f for f in plan.files}
    groups = []  # (file, row group, rows, row within file, global position), in position order
    for s in plan.shards:
        position = s.row_offset
        for p in s.pieces:
            file_row = p.file_row_start
            for rg in range(p.row_group_start, p.row_group_stop):
                n = files[p.file_uri].row_group_rows[rg]
                groups.append((files[p.file_uri], rg, n, file_row, position))
                file_row, position = file_row + n, position + n
    taken = max(1, round(max_rows * len(groups) / plan.num_rows))
    runs = min(runs, taken)
    out: list[Shard] = []
    for i in range(runs):
        begin = len(groups) * i // runs
        pieces: list[Piece] = []
        at = groups[begin][4]
        for f, rg, n, file_row, position in groups[begin:begin + taken * (i + 1) // runs - taken * i // runs]:
            if position != at:  # (a run is consecutive rows: it ends where the layout's positions jump)
                break
            _add_row_group(pieces, f, rg, n, file_row)
            at += n
        out.append(Shard(i, tuple(pieces), at - groups[begin][4], groups[begin][4]))
    return tuple(out)

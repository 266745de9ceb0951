"""Nightly runs read only what changed: the evaluation's results of each unit of work kept from
one run to the next.

Every run records, per encode task (and per kept group an incremental run scanned), the
held-out queries' exact top-k over its rows and their search over its codes (with the
candidates' exact distances), keyed by the shards' pieces: file, fingerprint, row groups
(`units.json` and one `.npz` per unit in the run's folder). An incremental run that keeps the
codec keeps the previous version's queries too; a kept shard whose unit is recorded is then
not read at all: its results are the recorded ones, shifted to its new place in the layout,
merged with the new shards' (deleted files' units are simply not merged), and its rows join
the inverted lists from the previous version's lists. Its ids for the duplicate check come
from its fragments, as before. So a run that adds one file to a hundred reads that file and
the footers. A run whose queries or codec change (a full rebuild, a retrain) records afresh, and so does
one whose search ranks codes otherwise than the recorded run's (`SCORING`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from vecpress.pipeline import storage
from vecpress.pipeline.buckets import open_batches
from vecpress.pipeline.context import load_arrays, save_arrays
from vecpress.pipeline.layout import Shard, SourcePlan
from vecpress.pipeline.lists import ListsSpec, write_task_lists
from vecpress.pipeline.sampling import file_rows, positions_in
from vecpress.pipeline.schema import codes_as_numpy


#: how the search over codes ranks them, as recorded with a unit's results; a unit recorded under
#: another is searched again. 2: cosine codes by L2 to their reconstruction (codecs.search);
#: units without it (1) ranked cosine codes by the inner product
SCORING = 2


def shard_key(shard: Shard) -> str:
    """What a shard's rows are, whatever its place: its pieces' files, fingerprints, row groups."""
    return json.dumps([[p.file_uri, p.fingerprint, p.row_group_start, p.row_group_stop] for p in shard.pieces])


@dataclass(frozen=True)
class Recorded:
    """One unit's recorded results: positions in the layout of the run that wrote them, where
    its first shard started at `row_offset`."""

    keys: tuple[str, ...]
    row_offset: int
    num_rows: int
    uri: str  # relative to OUT
    k: int  # results per query
    search: bool  # the search over the codes is recorded (search_D, search_I)
    extra: bool  # the search's candidates carry their exact distances (search_E)
    scoring: int = 1  # how the search ranked the codes (SCORING)

    def arrays(self, out: str, shift: int) -> dict[str, np.ndarray]:
        """knn_D, knn_I, search_D, search_I (and search_E), I shifted by `shift` rows."""
        a = load_arrays(storage.join(storage.normalize(out), self.uri))
        for name in ("knn_I", "search_I"):
            if name in a:
                a[name] = np.where(a[name] >= 0, a[name] + shift, -1)
        return a


class UnitRecorder:
    """Writes a run's units as their results are folded, then their index (`units.json`)."""

    def __init__(self, ctx):
        self.ctx, self.records = ctx, []

    def add(self, shards: list[Shard], knn: tuple, search: tuple | None) -> None:
        if knn[1] is None:  # (no exact top-k: nothing a later run could merge)
            return
        name = f"units/unit-{shards[0].index:06d}-{shards[-1].index:06d}.npz"
        arrays = {"knn_D": knn[0], "knn_I": knn[1]}
        if search is not None and search[1] is not None:
            arrays.update(search_D=search[0], search_I=search[1])
            if len(search) > 2 and search[2] is not None:
                arrays["search_E"] = search[2]
        uri = save_arrays(self.ctx.run_file(name), arrays)
        self.records.append({"keys": [shard_key(s) for s in shards], "row_offset": int(shards[0].row_offset),
                             "num_rows": int(sum(s.num_rows for s in shards)), "uri": self.ctx.relative(uri),
                             "k": int(knn[1].shape[1]), "search": "search_I" in arrays,
                             "extra": "search_E" in arrays, "scoring": SCORING})

    def save(self) -> str:
        uri = self.ctx.run_file("units.json")
        storage.write_bytes(uri, json.dumps(sorted(self.records, key=lambda r: r["row_offset"])).encode())
        return uri


def recorded_units(out: str, manifest: dict) -> list[Recorded] | None:
    """The units a version's run recorded, or None: a version from before, its run folder
    gone, or rows it dropped as duplicated ids (its lists then count table rows, not positions)."""
    rel = manifest["sample"].get("units_uri")
    if not rel or (manifest.get("id_check") or {}).get("rows_dropped"):
        return None
    base = storage.normalize(out)
    uri = storage.join(base, rel)
    if not storage.exists(uri):
        return None
    units = [Recorded(tuple(r["keys"]), r["row_offset"], r["num_rows"], r["uri"], r["k"], r["search"], r["extra"],
                      r.get("scoring", 1)) for r in json.loads(storage.read_bytes(uri))]
    return units if all(storage.exists(storage.join(base, u.uri)) for u in units) else None


@dataclass(frozen=True)
class Reused:
    """A recorded unit that covers kept shards `first..first + len(unit.keys) - 1` of the new
    layout: its rows moved by `shift` positions."""

    unit: Recorded
    first: int
    shift: int


def reusable(units: list[Recorded], kept: list[Shard], *, k: int, extra: bool) -> list[Reused]:
    """The recorded units whose shards are all kept and consecutive in the new layout, with
    `k` results per query (and the candidates' exact distances where `extra`), their codes
    ranked as this run's search ranks them (SCORING)."""
    where = {shard_key(s): i for i, s in enumerate(kept)}
    found = []
    for u in units:
        if u.k != k or not u.search or (extra and not u.extra) or u.scoring != SCORING:
            continue
        at = [where.get(key) for key in u.keys]
        if None not in at and at == list(range(at[0], at[0] + len(at))) and \
                sum(kept[i].num_rows for i in at) == u.num_rows:
            found.append(Reused(u, at[0], kept[at[0]].row_offset - u.row_offset))
    return found


def relist_group(group: int, *, previous: ListsSpec, spans: np.ndarray, spec: ListsSpec) -> str:
    """The rows of one group of the previous version's lists that reused units hold, moved to
    their new positions, as a task's lists file for this run's lists. `spans`: (old start,
    old stop, shift) per reused unit, sorted."""
    reader = open_batches(previous.group_uri(group))
    parts, positions, codes = [], [], []
    for p in range(reader.num_record_batches):
        batch = reader.get_batch(p)
        pos = batch.column(0).to_numpy()
        at = np.searchsorted(spans[:, 0], pos, side="right") - 1
        inside = (at >= 0) & (pos < spans[np.maximum(at, 0), 1])
        if inside.any():
            parts.append(np.full(int(inside.sum()), group * previous.partitions_per_group + p, np.int32))
            positions.append(pos[inside] + spans[at[inside], 2])
            codes.append(codes_as_numpy(batch.column(1).filter(pa.array(inside))))
    return write_task_lists(spec, f"kept-g{group:06d}", parts, positions, codes)


def query_positions_in(previous: SourcePlan, plan: SourcePlan, positions: np.ndarray) -> np.ndarray:
    """The queries' own rows (positions in `previous`'s layout, -1: none) at their positions
    in `plan`'s layout, in the same order; -1 where the row's file is gone or changed."""
    out = np.full(len(positions), -1, np.int64)
    have = np.nonzero(positions >= 0)[0]
    if not have.size:
        return out
    order = have[np.argsort(positions[have], kind="stable")]
    rows = file_rows(previous, positions[order])
    before = {f.uri: f.fingerprint for f in previous.files}
    now = {f.uri: f.fingerprint for f in plan.files}
    same = np.array([now.get(str(u)) == before.get(str(u)) for u in rows["uris"]], bool)
    found = positions_in(plan, rows)
    out[order] = np.where(same[rows["file_index"]], found, -1)
    return out

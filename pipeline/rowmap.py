"""Table rows and source positions: the one mapping between them.

A version holds the source's rows in position order (pipeline.layout), less the rows a run
dropped as duplicated ids (--duplicate-ids keep-first / keep-last). Everything that reads the
source for a table row (re-ranking from the source) or compares the table's rows with the
source's (the evaluation's exact neighbours, the held-out queries' own rows) goes through
`RowMap`. The dropped positions are one sorted int64 array in the run's folder, named by the
manifest (`id_check.dropped_uri`); a version that dropped nothing has no file and the
identity mapping, which costs nothing. The array is 8 bytes per dropped row (not per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vecpress.pipeline import storage
from vecpress.pipeline.context import load_array


@dataclass(frozen=True)
class RowMap:
    """Source positions -> table rows (-1 where dropped) and back, for one version."""

    #: sorted, unique source positions the version does not hold
    dropped: np.ndarray

    @classmethod
    def identity(cls) -> "RowMap":
        return cls(np.zeros(0, np.int64))

    @classmethod
    def of_manifest(cls, out: str, manifest: dict) -> "RowMap":
        """The mapping of a version: the identity unless its run dropped rows."""
        rel = (manifest.get("id_check") or {}).get("dropped_uri")
        if not rel:
            return cls.identity()
        return cls(load_array(storage.join(storage.normalize(out), rel)).astype(np.int64))

    def __bool__(self) -> bool:
        """Whether any row was dropped (False: table row == source position)."""
        return len(self.dropped) > 0

    def rows_of(self, positions: np.ndarray) -> np.ndarray:
        """Source positions (-1 = none) as table rows; -1 for a dropped position."""
        p = np.asarray(positions, np.int64)
        if not self:
            return p.copy()
        at = np.searchsorted(self.dropped, p, side="left")
        hit = self.dropped[np.minimum(at, len(self.dropped) - 1)] == p
        return np.where((p < 0) | hit, -1, p - at)

    def positions_of(self, rows: np.ndarray) -> np.ndarray:
        """Table rows (-1 = none) as source positions: row t is the t-th position not dropped."""
        t = np.asarray(rows, np.int64)
        if not self:
            return t.copy()
        # dropped[i] - i: rows held before the i-th dropped position
        before = self.dropped - np.arange(len(self.dropped), dtype=np.int64)
        return np.where(t < 0, -1, t + np.searchsorted(before, t, side="right"))

    def dropped_in(self, start: int, stop: int) -> np.ndarray:
        """The dropped positions in [start, stop), as offsets from `start`."""
        lo, hi = np.searchsorted(self.dropped, [start, stop], side="left")
        return self.dropped[lo:hi] - start

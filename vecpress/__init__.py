"""vecpress: compress corpus-scale embedding collections (Parquet) into searchable Lance
datasets, with the recall it costs measured on held-out queries.

The Python API (README "Python API"):

- `vecpress.compress(inputs, out, table, **options)`: the main job, the CLI's options by
  their Python names; returns the run's report;
- `vecpress.open(out, table, version=None, tag=None)`: a `Table` (the `production` version by
  default, else the latest) with `.search(q)` -> a `Query` built as LanceDB's are
  (`.limit`, `.nprobes`, `.rerank`, `.where`, `.select`, then `.to_arrow` / `.to_pandas` /
  `.to_list`), `.report()`, `.versions()`, `.tags()` and `.codec`.

The repository's folders install under this one name: `vecpress.kernels` (pure compute),
`vecpress.pipeline` (what a job does, without Prefect) and `vecpress.flows` (Prefect flows and
the `vecpress` command line). The API's names load on first use, so that importing a
subpackage does not load them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["CompressOptions", "Query", "Table", "__version__", "compress", "open"]

if TYPE_CHECKING:  # pragma: no cover
    from vecpress.pipeline.api import Query, Table, compress
    from vecpress.pipeline.api import open_table as open
    from vecpress.pipeline.options import CompressOptions

_LAZY = {"compress": ("vecpress.pipeline.api", "compress"), "open": ("vecpress.pipeline.api", "open_table"),
         "Table": ("vecpress.pipeline.api", "Table"), "Query": ("vecpress.pipeline.api", "Query"),
         "CompressOptions": ("vecpress.pipeline.options", "CompressOptions")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vecpress' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

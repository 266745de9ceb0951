"""vecpress: compress corpus-scale embedding collections (Parquet) into searchable Lance
datasets, with the recall it costs measured on held-out queries.

The repository's folders install under this one name: `vecpress.kernels` (pure compute),
`vecpress.pipeline` (what a job does, without Prefect) and `vecpress.flows` (Prefect flows and
the `vecpress` command line).
"""

__version__ = "0.1.0"

"""Typed errors. Each message names the file(s), column, row count and reason."""

from __future__ import annotations


class VecpressError(Exception):
    """Base class: an error the user can act on (bad input, conflicting output, bad spec)."""


class SourceError(VecpressError):
    """Input Parquet that cannot be compressed as asked: missing/unreadable files, wrong
    schema, bad vectors. Raised before anything is committed."""


class DuplicateIdError(SourceError):
    """Ids that occur more than once in the input, or in the input and the rows an
    incremental run keeps. Found while encoding; nothing is committed."""


class OutputConflictError(VecpressError):
    """The output table exists and is incompatible with this run (another schema)."""


class ConfigError(VecpressError):
    """Invalid options: unknown metric, impossible codec, bad table name."""


class OutputWriteError(VecpressError):
    """The output cannot be written (disk full, a read-only file system, no permission): names
    the path. Nothing is committed; the previous version stays as it was."""


class CorruptFileError(VecpressError):
    """A file vecpress wrote and reads back (a trained codec) is missing, damaged or altered
    since: names the file."""


class SourceChangedError(VecpressError):
    """The source files differ from the ones a dataset was built from (re-rank needs them)."""


class ClusterError(VecpressError):
    """The Ray cluster cannot run the job as asked (e.g. GPU encoders that never got a GPU)."""


class QualityGateError(VecpressError):
    """A new version did not pass the quality gate: it was committed but not tagged."""

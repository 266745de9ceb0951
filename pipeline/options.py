"""Every knob of a compress run, declared once.

`CompressOptions` is the one options model. Each field carries its type, its default, a
one-line help text (what it trades) and where it shows: its CLI group and the commands that
take it. The command line (`vecpress.flows.cli`), the Prefect flow's parameters
(`vecpress.flows.compress`), the sweep (`vecpress.pipeline.sweep`) and the run itself derive
from these declarations, so adding an option touches this file and the code that uses it.

Options are validated once, here, with a one-line ConfigError naming the option. Two that
overlap are normalised to one meaning: `ngpu=0` and `device="cpu"` both mean "no GPU at all"
(neither training nor encoding), so each implies the other.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Sequence

from vecpress.kernels.codecs.ivf import SERVED_GRAMMAR, is_served_spec
from vecpress.kernels.knn import METRICS
from vecpress.pipeline.errors import ConfigError
from vecpress.pipeline.identity import DUPLICATE_IDS
from vecpress.pipeline.source import SourceSpec

#: most row groups the sample reads by default (sampling.choose_positions; 0 = no limit)
SAMPLE_ROW_GROUPS = 1024
#: the re-rank factors the advisor can judge by (those an evaluation measures, and 0 = off)
ADVISE_RERANK_FACTORS = (0, 1, 2, 4, 10)

#: what an output table serves (CompressOptions.serve)
SERVE = ("codes", "lancedb")

#: the CLI commands that run the compress job, and the sweep
RUN = ("compress", "schedule")
JOB = ("compress", "schedule", "demo")
ALL = ("compress", "schedule", "demo", "sweep")

#: CLI argument groups, in the order --help shows them
GROUPS = ("source", "codec and evaluation", "advisor (--codec auto)", "nightly runs", "execution")


@dataclass(frozen=True)
class OptionInfo:
    """How an option shows outside the code: its help text, CLI group and commands, and for
    the command line its choices, metavar, the separator of a tuple's items and its flag
    (default `--<name with dashes>`; `--no-<name>` for an option that defaults to True)."""

    help: str
    group: str
    commands: tuple[str, ...]
    choices: tuple | None = None
    metavar: str | None = None
    sep: str | None = None
    flag: str | None = None


def option(default: Any, help: str, *, group: str, commands: tuple[str, ...] = JOB, **info: Any):
    """A field of CompressOptions: its default and its OptionInfo (in the field's metadata)."""
    assert group in GROUPS, group
    return dataclasses.field(default=default, metadata={"option": OptionInfo(help, group, commands, **info)})


@dataclass(frozen=True)
class CompressOptions:
    """Knobs of one compress run (and of a sweep, which takes the sampling and execution ones).
    Each trades something; the defaults suit 10^5..10^9 vectors."""

    # ---- source -------------------------------------------------------------------------
    vector_column: str | None = option(
        None, "vector column (default: the only float-list column)", group="source", commands=RUN + ("sweep",))
    id_column: str = option("id", "id column, int64 or string, copied to the output", group="source",
                            commands=RUN + ("sweep",))
    keep: tuple[str, ...] = option((), "passthrough columns copied unchanged to the output (e.g. text,url)",
                                   group="source", commands=RUN, sep=",", metavar="COLS")
    duplicate_ids: str = option(
        "refuse", "an id that occurs more than once (in the input, or against the rows an incremental run keeps): "
                  "refuse (nothing committed), or commit only its first or last row by position (the others are "
                  "dropped and counted in the report)", group="source", commands=RUN, choices=DUPLICATE_IDS)
    follow_links: bool = option(False, "read what symbolic links inside the input folders point to (each real file "
                                       "once, a link cycle walked once) instead of refusing them",
                                group="source", commands=RUN + ("sweep",))
    allow_schema_change: bool = option(False, "replace an existing table even if its schema differs",
                                       group="source", commands=RUN)
    # ---- codec and evaluation ---------------------------------------------------------------
    codec: str | None = option(
        None, "codec spec (faiss factory string, extended): PQm, PQmxb, PQmx4fs, OPQm,PQm, RQmxb, LSQmxb, SQ4/6/8, "
              "SQfp16, SQbf16, RaBitQ, BIN, MRLn,<codec>..., or auto (with --max-bytes or --min-recall); "
              "default PQm with m = dim/4, at most 64 bytes", group="codec and evaluation")
    serve: str = option("codes", "what the output table serves: codes (vecpress's codes, searched by vecpress) or "
                                 "lancedb (the vectors and a LanceDB IVF_PQ index that vecpress builds: LanceDB's "
                                 "tbl.search(q) searches it; --codec then names the index, e.g. IVF256,PQ48)",
                         group="codec and evaluation", choices=SERVE)
    vector_dtype: str = option("float16", "--serve lancedb: the type of the stored vectors, which LanceDB's "
                                          "refine_factor re-ranks with (float16: half the bytes, the same recall)",
                               group="codec and evaluation", choices=("float16", "float32"))
    metric: str = option("l2", "distance the codes are searched with; cosine = normalise, then inner product (all-zero "
                                 "vectors are refused)",
                         group="codec and evaluation", commands=ALL, choices=METRICS)
    num_train: int = option(100_000, "training-sample size: more trains better codebooks, slower and with more "
                                     "memory", group="codec and evaluation", commands=ALL)
    num_queries: int = option(1_000, "held-out query vectors for evaluation, never trained on (at most 10% of "
                                     "the rows)", group="codec and evaluation", commands=ALL)
    seed: int = option(0, "seeds sampling and training (0 or more): the same inputs and seed give the same codes",
                       group="codec and evaluation", commands=ALL)
    sample_row_groups: int = option(
        SAMPLE_ROW_GROUPS, "most Parquet row groups the sample reads, chosen at random; rows are drawn uniformly "
                           "within them. 0 = no limit: exactly uniform rows, which touches nearly every row group "
                           "once the sample outnumbers them", group="codec and evaluation", commands=ALL, metavar="N")
    eval_k: int = option(100, "exact neighbours per held-out query (recall@k is reported for k in 1, 10, 100 up "
                              "to it)", group="codec and evaluation", commands=ALL)
    rerank_codec: str | None = option(
        None, "also store a warm column with this codec (e.g. SQ8, SQfp16) for re-ranking without the source; "
              "costs its bytes per vector", group="codec and evaluation", metavar="SPEC")
    partitions: int | None = option(
        None, "a codes table's coarse partitions (IVF, trained with the codec): a query scores only the codes of "
              "its --nprobes nearest ones. Default (auto): about sqrt(rows), a power of two, for tables of 100,000 "
              "rows or more; 0 = none (every query scores every code)", group="codec and evaluation", metavar="N")
    residual: bool = option(True, "list a partitioned table's rows by the codes of their residuals to their "
                                  "partition's centroid (a second codec of the same spec, trained on residuals, "
                                  "as IVF-PQ does: more recall for the same bytes) instead of the table's codes, "
                                  "where they rank the sample's neighbours better (binary and MRL codecs always "
                                  "list their own codes)",
                            group="codec and evaluation", flag="--no-residual")
    eval_rerank: bool = option(True, "skip measuring recall after exact re-ranking (it reads the candidates' "
                                     "vectors back)", group="codec and evaluation", flag="--no-eval-rerank")
    # ---- advisor ------------------------------------------------------------------------------
    max_bytes: int | None = option(None, "sweep candidate codecs, keep the best recall@10 within B bytes per "
                                         "vector", group="advisor (--codec auto)", metavar="B")
    min_recall: float | None = option(None, "sweep candidate codecs, keep the fewest bytes reaching recall@10 R",
                                      group="advisor (--codec auto)", metavar="R")
    advise_rerank: int = option(0, "judge recall@10 after exact re-ranking of r x 10 candidates",
                                group="advisor (--codec auto)", choices=ADVISE_RERANK_FACTORS, metavar="r")
    advise_codecs: tuple[str, ...] | None = option(
        None, "';'-separated candidate codecs (default: the default grid within the budget)",
        group="advisor (--codec auto)", sep=";", metavar="SPECS")
    # ---- nightly runs ---------------------------------------------------------------------------
    mode: str = option("auto", "auto: extend the table's latest version when possible (only new/rewritten files "
                               "encoded, deleted ones dropped); full: rebuild everything", group="nightly runs",
                       choices=("auto", "full"))
    drift_threshold: float = option(0.10, "retrain when the reconstruction error on fresh data grew by more than "
                                          "this fraction", group="nightly runs")
    force_retrain: bool = option(False, "retrain and re-encode everything", group="nightly runs")
    gate_min_recall: float | None = option(None, "tag the version 'production' only if recall@10 >= R (default: "
                                                 "no floor)", group="nightly runs", metavar="R")
    gate_max_drop: float = option(0.02, "... and recall@10 is at most D below the production version's",
                                  group="nightly runs", metavar="D")
    keep_versions: int = option(20, "versions kept, and failed versions (tags failed-<run id>) kept; run folders "
                                    "go with their versions (tagged versions are never removed; 0 = all)",
                                group="nightly runs")
    # ---- execution ----------------------------------------------------------------------------
    batch_size: int = option(0, "rows per batch in a worker; bounds its memory. 0 = automatic: about 24 MiB of "
                                "vectors on CPUs (16,384 rows at 384-d), 65,536 rows for GPU encoders",
                             group="execution", commands=ALL)
    shard_rows: int = option(500_000, "rows per shard (whole row groups): the unit of parallel work and of retry",
                             group="execution", commands=ALL)
    ngpu: int = option(-1, "GPUs to use, -1 = all, 0 = none (as --device cpu): faiss training, and one encoder "
                           "actor per GPU on a Ray cluster with GPUs. On a cluster joined by address, N actors are "
                           "asked for even beyond the GPUs it has now (an autoscaler adds them) and awaited up to "
                           "$VECPRESS_GPU_WAIT_S seconds, 600 by default", group="execution", commands=ALL)
    device: str = option("auto", "where workers encode and compute exact neighbours without GPU actors: auto (a "
                                 "GPU when CuPy sees one), cuda[:N] (an error where a worker sees no such GPU) or "
                                 "cpu (no GPU at all, as --ngpu 0)", group="execution")
    ray_address: str | None = option(None, "Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray)",
                                     group="execution", commands=ALL)

    def __post_init__(self):
        for name in ("keep", "advise_codecs"):  # JSON and the CLI give lists
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple([value] if isinstance(value, str) else value))
        if self.keep is None:  # (a deployment's `keep: null`)
            object.__setattr__(self, "keep", ())
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        for name in ("num_train", "num_queries", "eval_k", "shard_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:  # (numpy's SeedSequence refuses it, inside the first Ray task)
            raise ConfigError(f"--seed must not be negative, got {self.seed}")
        if self.partitions is not None and (self.partitions < 0 or self.partitions > 65_536):
            raise ConfigError(f"--partitions must be from 0 (none) to 65536, got {self.partitions}")
        if self.partitions and self.serve == "lancedb":
            raise ConfigError("--partitions partitions a codes table; with --serve lancedb, --codec names the "
                              "index's partitions (e.g. IVF256,PQ48)")
        if self.batch_size < 0:
            raise ConfigError(f"batch_size must be at least 1, or 0 for the automatic size, got {self.batch_size}")
        if self.sample_row_groups < 0:
            raise ConfigError(f"sample_row_groups must not be negative, got {self.sample_row_groups}")
        if self.ngpu < -1:
            raise ConfigError(f"--ngpu must be -1 (all GPUs), 0 (none) or a count, got {self.ngpu}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.device == "cpu" or self.ngpu == 0:  # one meaning: no GPU at all
            object.__setattr__(self, "device", "cpu")
            object.__setattr__(self, "ngpu", 0)
        wants_advice = self.max_bytes is not None or self.min_recall is not None
        if self.codec is None and wants_advice:
            object.__setattr__(self, "codec", "auto")
        if self.codec == "auto" and not wants_advice:
            raise ConfigError("--codec auto needs a target: --max-bytes B (best recall within B bytes per vector) "
                              "or --min-recall R (fewest bytes reaching recall@10 R)")
        if wants_advice and self.codec != "auto":
            raise ConfigError(f"--max-bytes/--min-recall choose the codec; they cannot be combined with --codec {self.codec}")
        if self.max_bytes is not None and self.min_recall is not None:
            raise ConfigError("give either --max-bytes or --min-recall, not both")
        if self.min_recall is not None and not 0 < self.min_recall <= 1:
            raise ConfigError(f"--min-recall must be in (0, 1], got {self.min_recall}")
        if self.advise_rerank not in ADVISE_RERANK_FACTORS:
            raise ConfigError(f"advise_rerank must be one of {', '.join(map(str, ADVISE_RERANK_FACTORS))} (the "
                              f"measured factors), got {self.advise_rerank}")
        if self.serve not in SERVE:
            raise ConfigError(f"--serve must be one of {', '.join(SERVE)}, got {self.serve!r}")
        served = is_served_spec(self.codec)
        if self.serve == "codes" and served:
            raise ConfigError(f"--codec {self.codec} names a LanceDB index: add --serve lancedb")
        if self.serve == "lancedb":
            if self.codec not in (None, "auto") and not served:
                raise ConfigError(f"--serve lancedb builds a LanceDB vector index: --codec must name it "
                                  f"({SERVED_GRAMMAR}; e.g. IVF256,PQ48), not {self.codec}")
            if self.rerank_codec:
                raise ConfigError("--rerank-codec adds a warm column to a codes table; with --serve lancedb, LanceDB's "
                                  "refine_factor re-ranks with the stored vectors (--vector-dtype)")
        if self.vector_dtype not in ("float16", "float32"):
            raise ConfigError(f"--vector-dtype must be float16 or float32, got {self.vector_dtype!r}")
        if self.duplicate_ids not in DUPLICATE_IDS:
            raise ConfigError(f"--duplicate-ids must be one of {', '.join(DUPLICATE_IDS)}, got {self.duplicate_ids!r}")
        if self.mode not in ("auto", "full"):
            raise ConfigError(f"mode must be auto or full, got {self.mode!r}")
        if self.drift_threshold < 0 or self.gate_max_drop < 0 or self.keep_versions < 0:
            raise ConfigError("drift_threshold, gate_max_drop and keep_versions must not be negative")
        if self.gate_min_recall is not None and not 0 <= self.gate_min_recall <= 1:
            raise ConfigError(f"--gate-min-recall must be in [0, 1], got {self.gate_min_recall}")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "CompressOptions":
        """From flat, JSON-able parameters (a flow run's, a deployment's); ConfigError for a
        name that is no option."""
        unknown = sorted(set(params) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(OPTIONS)}")
        return cls(**params)

    def source(self, inputs: Sequence[str] | str) -> SourceSpec:
        """The files and columns a run reads: `inputs` (files, folders or URIs) and these
        options' columns."""
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        return SourceSpec(tuple(str(i) for i in inputs), self.vector_column, self.id_column, tuple(self.keep),
                          follow_links=self.follow_links)

    def to_params(self) -> dict[str, Any]:
        """The options as flat JSON-able values (tuples as lists): what `from_params` takes."""
        return {name: list(v) if isinstance(v, tuple) else v for name, v in dataclasses.asdict(self).items()}

    def changed(self) -> dict[str, Any]:
        """The options whose value differs from the default, as `to_params` gives them."""
        default = CompressOptions().to_params()
        return {name: v for name, v in self.to_params().items() if v != default[name]}


@dataclass(frozen=True)
class Option:
    """One declared option: its name, type (as annotated, with None allowed or not), default
    and OptionInfo."""

    name: str
    type: Any
    optional: bool
    default: Any
    info: OptionInfo

    @property
    def item_type(self) -> type:
        """The type of the value, or of a tuple's items."""
        args = typing.get_args(self.type)
        return args[0] if typing.get_origin(self.type) is tuple else self.type


def _declared() -> dict[str, Option]:
    hints = typing.get_type_hints(CompressOptions)
    out = {}
    for f in dataclasses.fields(CompressOptions):
        t = hints[f.name]
        args = typing.get_args(t)
        optional = type(None) in args
        if optional:
            t = next(a for a in args if a is not type(None))
        out[f.name] = Option(f.name, t, optional, f.default, f.metadata["option"])
    return out


#: every option by name, in declaration order
OPTIONS: dict[str, Option] = _declared()


def options_of(command: str) -> list[Option]:
    """The options a CLI command takes, in declaration order."""
    return [o for o in OPTIONS.values() if command in o.info.commands]

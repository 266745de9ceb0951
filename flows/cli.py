"""`vecpress`: demo, compress, inspect, evaluate, search, sweep, generate, schedule."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import warnings

import vecpress.flows  # noqa: F401  (sets Prefect/Ray environment defaults before they are imported)
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.options import CompressOptions, options_of

log = logging.getLogger("vecpress")


def _version(v: str) -> int | str:
    return int(v) if v.isdigit() else v


def _shown(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def add_options(p: argparse.ArgumentParser, command: str, *, defaults: dict | None = None,
                helps: dict | None = None) -> None:
    """The options model's options for `command`, grouped as declared (vecpress.pipeline.options);
    `defaults` and `helps` replace some for this command."""
    groups: dict = {}
    for o in options_of(command):
        group = groups.get(o.info.group) or groups.setdefault(o.info.group, p.add_argument_group(o.info.group))
        default = (defaults or {}).get(o.name, o.default)
        flag = o.info.flag or "--" + o.name.replace("_", "-")
        help = (helps or {}).get(o.name, o.info.help).replace("%", "%%")
        if o.type is bool:
            group.add_argument(flag, dest=o.name, action="store_false" if default else "store_true", default=default,
                               help=help)
            continue
        if default not in (None, ()):
            help += f" (default: {_shown(default)})"
        kwargs = {"dest": o.name, "default": default, "metavar": o.info.metavar, "help": help}
        if o.info.sep:
            kwargs["type"] = lambda s, sep=o.info.sep: tuple(part.strip() for part in s.split(sep) if part.strip())
        elif o.item_type in (int, float):
            kwargs["type"] = o.item_type
        if o.info.choices:
            kwargs["choices"] = o.info.choices
        group.add_argument(flag, **kwargs)


def _add_run_switches(p: argparse.ArgumentParser) -> None:
    """The switches of a command that runs the job here (not options of the run itself)."""
    g = p.add_argument_group("output")
    g.add_argument("--no-prefect", action="store_true", help="run the stages directly instead of as a Prefect flow")
    g.add_argument("--json", action="store_true", help="print the new version's inspect object as JSON")


def options_from_args(args, command: str) -> CompressOptions:
    """The options `command` took on its command line (the others at their defaults)."""
    return CompressOptions(**{o.name: getattr(args, o.name) for o in options_of(command)})


def _paths(args, command: str) -> tuple[list[str], str]:
    *inputs, out = args.paths
    if not inputs:
        raise VecpressError(f"{command} needs at least one input and an output: vecpress {command} INPUT... OUT")
    return inputs, out


def _run(inputs: list[str], out: str, table: str, opts: CompressOptions, *, no_prefect: bool) -> dict:
    """Run the compress job (as the Prefect flow, or directly) and return its run report."""
    if no_prefect:
        from vecpress.pipeline.run import run_compress

        return run_compress(inputs, out, table, opts).report
    from vecpress.flows.compress import compress_flow
    from vecpress.flows.server import start_temporary_server

    _quiet_prefect_console(quiet=log.level >= logging.WARNING)
    start_temporary_server()  # (without PREFECT_API_URL: apart from the terminal's Ctrl-C)
    return compress_flow(inputs=inputs, out=out, table=table, **opts.to_params())


class _PrefectConsoleFilter(logging.Filter):
    """On Prefect's console handler (root logger): no traceback for vecpress's own errors (bad input, a failed
    gate: the message says it all, and main prints it once more), and with -q nothing below
    WARNING. The run's logs sent to the Prefect API keep their tracebacks."""

    def __init__(self, quiet: bool):
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if self.quiet and record.levelno < logging.WARNING:
            return False
        if record.exc_info and isinstance(record.exc_info[1], VecpressError):
            # (the run loggers' API handlers have sent the record before it reaches the console
            # handler, up on the root logger)
            record.exc_info = record.exc_text = None
        return True


def _quiet_prefect_console(*, quiet: bool) -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:  # (Prefect's logging config puts it on the root logger)
        if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(f, _PrefectConsoleFilter) for f in handler.filters):
            handler.addFilter(_PrefectConsoleFilter(quiet))


def _print_result(info: dict, as_json: bool) -> None:
    from vecpress.pipeline.report import summary_table

    if as_json:
        print(json.dumps(info, indent=1, default=str))
        return
    run = info.get("run")
    if run is not None and not run["committed"]:
        print(f"nothing committed: {run['reason']}")
        return
    print(summary_table(info))
    if run is not None:
        print(run_line(run))


def run_line(run: dict) -> str:
    parts = [f"run {run['run_id']}: {run['mode']} build"]
    if run["mode"] == "incremental":
        parts.append(f"+{run['rows_added']:,} / -{run['rows_removed']:,} rows ({run['files_added']} new, "
                     f"{run['files_rewritten']} rewritten, {run['files_removed']} deleted files)")
        if run.get("rows_reencoded"):
            parts.append(f"{run['rows_reencoded']:,} unchanged rows encoded again (shards packed anew)")
    if run.get("drift"):
        parts.append(f"drift: {run['drift']['reason']}")
    if run.get("gate"):
        parts.append(f"gate: {run['gate']['reason']}")
    return "; ".join(parts)


#: what the demo sets whatever its flags say: every demo run rebuilds its table and shows its numbers
DEMO_FIXED = {"keep": ("text",), "allow_schema_change": True, "mode": "full", "gate_max_drop": 1.0}


def cmd_demo(args) -> None:
    from vecpress.pipeline import storage
    from vecpress.pipeline.demo import corpus_parameters, demo_codec, write_corpus, written_corpus

    if args.codec is None and args.dim >= 1:  # (write_corpus refuses --dim 0)
        args.codec = demo_codec(args.dim)
    opts = dataclasses.replace(options_from_args(args, "demo"), **DEMO_FIXED)  # checked before writing
    src = storage.join(args.out, "source")
    wanted = corpus_parameters(args.rows, args.dim, args.files, args.seed)
    if written_corpus(src) == wanted:
        log.info("using the sample corpus already in %s", src)
    else:  # none yet, or made with other --rows/--dim/--files/--seed
        write_corpus(src, num_rows=args.rows, dim=args.dim, num_files=args.files, seed=args.seed)
    info = _run([src], args.out, args.table, opts, no_prefect=args.no_prefect)
    _print_result(info, args.json)
    if not args.json:
        print(f"\nquery it: python -c \"import lancedb; print(lancedb.connect('{args.out}')"
              f".open_table('{args.table}').search().where('id < 5').to_pandas())\"")


def cmd_compress(args) -> None:
    inputs, out = _paths(args, "compress")
    _print_result(_run(inputs, out, args.table, options_from_args(args, "compress"), no_prefect=args.no_prefect),
                  args.json)


def cmd_inspect(args) -> None:
    from vecpress.pipeline.report import inspect_table

    _print_result(inspect_table(args.out, args.table, args.version), args.json)


def cmd_evaluate(args) -> None:
    from vecpress.pipeline.distributed import RayExecutor
    from vecpress.pipeline.evaluate import evaluate_version
    from vecpress.pipeline.lance_io import require_dataset
    from vecpress.pipeline.report import rerank_source

    version = require_dataset(args.out, args.table, args.version).version
    with RayExecutor(args.ray_address) as ex:  # (a tag: it may name a version on a branch of its own)
        ev = evaluate_version(args.out, args.table, args.version if isinstance(args.version, str) else version, ex, k=args.k, rerank=args.rerank, recompute=True)
    if args.json:
        print(json.dumps({"table": args.table, "version": version, **ev}, indent=1))
        return
    r = {k: ev.get(f"recall_at_{k}") for k in (1, 10, 100)}
    print(f"{args.table} version {version}: search over the stored codes, {ev['num_queries']} held-out queries, "
          f"k={ev['k']}")
    print("recall@1/10/100 " + " / ".join("n/a" if v is None else f"{v:.3f}" for v in r.values()))
    for factor, row in (ev.get("rerank") or {}).items():
        if "recall_at_10" in row:
            print(f"re-ranked @10 r={factor} {row['recall_at_10']:.3f}  ({rerank_source(ev['rerank_from'])})")
    print(f"relative error {ev['relative_error']:.4f}")


def cmd_search(args) -> None:
    """The Python API's search (vecpress.open(...).search(q)), printed: the same code path."""
    from vecpress.pipeline.api import Table
    from vecpress.pipeline.search import named_scores, read_query_vectors

    tbl = Table(args.out, args.table, args.version)
    m = tbl.manifest
    xq = read_query_vectors(args.queries, args.query_column or m["source"]["vector_column"], m["dim"],
                            metric=m["metric"])
    query = tbl.search(xq).limit(args.k)
    if args.nprobes is not None:
        query = query.nprobes(args.nprobes)
    if args.rerank:
        query = query.rerank(args.rerank, source=args.rerank_from == "source", column=args.rerank_from == "column")
    if args.where:
        query = query.where(args.where)
    hamming = tbl.serve == "codes" and not args.rerank and _binary_codes(args.out, m)
    result = named_scores(query.to_arrow(), m["metric"], m["source"]["id_column"], hamming=hamming)
    if args.json:
        for row in result.to_pylist():
            print(json.dumps(row, default=str))
    else:
        print(result.to_pandas().to_string(index=False))


def _binary_codes(out: str, m: dict) -> bool:
    """Whether a version's codes are binary (searched by Hamming distance)."""
    if "codec_binary" in m:
        return bool(m["codec_binary"])
    from vecpress.pipeline.codec_store import load_codec  # (manifests written before it was recorded)
    from vecpress.pipeline.context import manifest_codec

    return m.get("codec") is not None and load_codec(manifest_codec(out, m["codec"])).is_binary


def cmd_sweep(args) -> None:
    from vecpress.pipeline.distributed import RayExecutor
    from vecpress.pipeline.sweep_report import markdown_table, sweep_corpus

    try:
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()] if args.budgets else None
    except ValueError:
        raise VecpressError(f"--budgets takes comma-separated byte counts (e.g. 16,32,64), got {args.budgets!r}") from None
    opts = options_from_args(args, "sweep")
    with RayExecutor(opts.ray_address) as ex:
        result, uris = sweep_corpus(args.inputs, args.out, opts, codecs=list(args.codecs) if args.codecs else None,
                                    budgets=budgets, executor=ex)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(markdown_table(result, budgets))
        print("wrote " + ", ".join(uris.values()))


def cmd_generate(args) -> None:
    from vecpress.pipeline.demo import write_corpus

    for f in write_corpus(args.out, num_rows=args.rows, dim=args.dim, num_files=args.files, seed=args.seed):
        print(f)


def cmd_schedule(args) -> None:
    from vecpress.flows.schedule import nightly_parameters, serve_nightly

    inputs, out = _paths(args, "schedule")
    opts = options_from_args(args, "schedule")
    if args.print_parameters:
        print(json.dumps(nightly_parameters(inputs, out, args.table, opts), indent=1))
        return
    log.info("serving the nightly deployment of table %r (%s %s); Ctrl-C stops it", args.table, args.cron, args.timezone)
    serve_nightly(inputs, out, args.table, opts, cron=args.cron, timezone=args.timezone, name=args.name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vecpress", description="Compress Parquet embeddings into a searchable "
                                "Lance dataset and measure the recall it costs.")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="generate a sample corpus, compress it, print a summary")
    d.add_argument("--out", default="demo-out", help="output folder (LanceDB database) (default: %(default)s)")
    d.add_argument("--table", default="corpus", help="table name (default: %(default)s)")
    d.add_argument("--rows", type=int, default=100_000, help="vectors to generate (default: %(default)s)")
    d.add_argument("--dim", type=int, default=384, help="dimension (default: %(default)s)")
    d.add_argument("--files", type=int, default=4, help="Parquet files to generate (default: %(default)s)")
    add_options(d, "demo", defaults={"metric": "cosine"},
                helps={"codec": "codec spec, as for compress (default: PQm with m = dim/8: PQ48 at 384-d)"})
    _add_run_switches(d)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("compress", help="compress Parquet files into a new version of a Lance table")
    c.add_argument("paths", nargs="+", metavar="INPUT... OUT",
                   help="Parquet files/folders (local or URIs like s3://bucket/prefix), then the output folder")
    c.add_argument("--table", required=True, help="output table name (OUT/<table>.lance)")
    add_options(c, "compress")
    _add_run_switches(c)
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser("inspect", help="describe a table version and its evaluation")
    i.add_argument("out", help="output folder")
    i.add_argument("--table", required=True)
    i.add_argument("--version", type=_version, default=None, help="version number or tag, e.g. production or "
                   "failed-<run id> (default: production, the last version that passed the quality gate)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("evaluate", help="re-measure a version's recall by searching its stored codes (the "
                                        "run measured it while encoding; this reads the codes and the source back)")
    e.add_argument("out", help="output folder")
    e.add_argument("--table", required=True)
    e.add_argument("--version", type=_version, default=None, help="version number or tag (default: production)")
    e.add_argument("-k", type=int, default=None, help="results per query, at most the run's --eval-k (default: it)")
    e.add_argument("--no-rerank", dest="rerank", action="store_false",
                   help="skip the re-ranked recall (it reads the candidates' vectors back)")
    e.add_argument("--ray-address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else local)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("search", help="top-k ids for query vectors: over the codes, or LanceDB's index for a "
                       "--serve lancedb table (the Python API's search)")
    s.add_argument("out", help="output folder")
    s.add_argument("--table", required=True)
    s.add_argument("--queries", required=True, help="Parquet file/folder of query vectors, or a .npy file of an "
                   "(n, dim) float array")
    s.add_argument("--query-column", default=None, help="vector column in the queries (default: the table's)")
    s.add_argument("-k", type=int, default=10, help="results per query (default: %(default)s)")
    s.add_argument("--rerank", type=int, default=0, metavar="R",
                   help="re-rank R x k candidates exactly against the source vectors (a LanceDB-served table: "
                        "refine_factor R, with its stored vectors) (default: off)")
    s.add_argument("--rerank-from", choices=["auto", "source", "column"], default="auto",
                   help="where re-rank vectors come from: the warm column, the source Parquet, or auto "
                        "(the warm column when the table has one) (default: %(default)s)")
    s.add_argument("--nprobes", type=int, default=None, metavar="N",
                   help="partitions a query probes: a codes table with partitions (default: the version's, "
                        "chosen by its evaluation) or a LanceDB-served table (default: LanceDB's)")
    s.add_argument("--where", default=None, metavar="SQL",
                   help="search only the rows this Lance SQL filter selects, e.g. \"lang = 'en'\"")
    s.add_argument("--version", type=_version, default=None, help="version number or tag (default: production)")
    s.add_argument("--json", action="store_true", help="one JSON object per result line")
    s.set_defaults(func=cmd_search)

    w = sub.add_parser("sweep", help="measure a grid of codecs on your data: bytes, recall, error, speed")
    w.add_argument("inputs", nargs="+", metavar="INPUT", help="Parquet files/folders or URIs")
    w.add_argument("--out", required=True, help="folder for sweep.json, sweep.md and sweep.png")
    w.add_argument("--codecs", default=None, metavar="SPECS", type=lambda v: [c.strip() for c in v.split(";") if c.strip()],
                   help="';'-separated codec specs (default: a grid covering 8..256 bytes per vector)")
    w.add_argument("--budgets", default=None, metavar="B,B,...",
                   help="byte budgets: narrows the grid to the largest and reports the best codec within each")
    add_options(w, "sweep")
    w.add_argument("--json", action="store_true", help="print the sweep as JSON instead of Markdown")
    w.set_defaults(func=cmd_sweep)

    g = sub.add_parser("generate", help="write a clustered sample corpus as Parquet")
    g.add_argument("out", help="folder for the Parquet files")
    g.add_argument("--rows", type=int, default=100_000)
    g.add_argument("--dim", type=int, default=384)
    g.add_argument("--files", type=int, default=4)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)
    n = sub.add_parser("schedule", help="serve the compress flow on a cron schedule (nightly) until Ctrl-C")
    n.add_argument("paths", nargs="+", metavar="INPUT... OUT",
                   help="Parquet files/folders (local or URIs like s3://bucket/prefix), then the output folder")
    n.add_argument("--table", required=True, help="output table name (OUT/<table>.lance)")
    n.add_argument("--cron", default="0 2 * * *", help="when to run, a cron expression (default: %(default)s)")
    n.add_argument("--timezone", default="UTC", help="time zone of --cron, e.g. Europe/Berlin (default: %(default)s)")
    n.add_argument("--name", default=None, help="deployment name (default: vecpress-nightly-<table>)")
    n.add_argument("--print-parameters", action="store_true",
                   help="print the deployment's parameters as JSON (as in infra/prefect.yaml) and exit")
    add_options(n, "schedule")
    n.set_defaults(func=cmd_schedule)
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record: main called again in one process (tests,
    notebooks) after sys.stderr was replaced must not write to the stream it had then (a closed
    one: "--- Logging error ---" and a traceback, on the command's one-line errors)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Stop:
    """The command's SIGINT/SIGTERM handling (`with _Stop():` around it). The first signal raises
    KeyboardInterrupt in the main thread, so the run stops through its usual failure path
    (run_compress's `with` blocks release the lease and shut Ray down; nothing is committed;
    SIGTERM's default would kill the process without any of that, and under Ray abort it). A
    second signal, also during the exit (Prefect stopping its server, Ray its processes), exits
    at once. Without an interrupt the previous handlers come back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        #: the signal that stopped the command (Ray turns the exception a handler raises during
        #: ray.wait into a plain KeyboardInterrupt, so the exception cannot tell)
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> "_Stop":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._interrupt) for s in self.SIGNALS}
        return self

    def __exit__(self, kind, exc, tb) -> None:
        stopped = exc is not None and self.signal_of(exc) is not None  # (also Prefect's TerminationSignal)
        for s, handler in self.previous.items():
            signal.signal(s, _exit_at_once if stopped else handler)

    def _interrupt(self, signum, frame) -> None:
        self.signum = signum
        for s in self.previous:
            signal.signal(s, _exit_at_once)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def signal_of(self, exc: BaseException) -> int | None:
        """The signal that `exc` stands for (a KeyboardInterrupt, or the TerminationSignal
        Prefect's flow engine raises from its own SIGTERM handler), else None."""
        if isinstance(exc, KeyboardInterrupt):
            return self.signum or signal.SIGINT
        external = getattr(sys.modules.get("prefect.exceptions"), "ExternalSignal", ())
        if isinstance(exc, external) and isinstance(getattr(exc, "signal", None), int):
            return exc.signal
        return None


def _exit_at_once(signum, frame) -> None:
    """A second SIGINT/SIGTERM while the first one's run stops: exit now (the lease of a dead
    process is taken over by the next run; nothing half-written is ever committed)."""
    print(f"vecpress: {signal.Signals(signum).name} again: exiting at once", file=sys.stderr)
    if "prefect" in sys.modules:
        from vecpress.flows.server import stop_temporary_server

        stop_temporary_server()
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s vecpress %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    logging.getLogger("faiss").setLevel(logging.WARNING)
    # Ray starts its processes with fork+exec; lance/lancedb warn about fork-safety in general
    warnings.filterwarnings("ignore", message=".*not fork-safe.*")
    warnings.filterwarnings("ignore", message=".*fork support is experimental.*")
    stop = _Stop()
    try:
        if getattr(args, "table", None) is not None:  # every command with a table checks its name first
            from vecpress.pipeline.lance_io import check_table_name

            check_table_name(args.table)
        with stop:
            args.func(args)
    except VecpressError as exc:
        print(f"vecpress: error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        signum = stop.signal_of(exc)
        if signum is None:
            raise
        print(f"vecpress: interrupted ({signal.Signals(signum).name}); a run stopped before its commit commits "
              "nothing (one stopped after it is evaluated and gated by the next run)", file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`vecpress`: demo, compress, inspect, search, generate."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

import vecpress.flows  # noqa: F401  (sets Prefect/Ray environment defaults before they are imported)
from vecpress.pipeline.errors import VecpressError

log = logging.getLogger("vecpress")


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def _version(v: str) -> int | str:
    return int(v) if v.isdigit() else v


def _specs(s: str | None) -> list[str] | None:
    """Codec specs separated by ';' (specs themselves contain commas: OPQ16,PQ16)."""
    return [p.strip() for p in s.split(";") if p.strip()] if s else None


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vector-column", default=None, help="vector column (default: the only float-list column)")
    p.add_argument("--id-column", default="id", help="id column, int64 or string (default: %(default)s)")
    p.add_argument("--keep", default="", help="comma-separated passthrough columns copied to the output")
    p.add_argument("--allow-schema-change", action="store_true",
                   help="replace an existing table even if its schema differs")


def _add_compress_options(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    g = p.add_argument_group("codec and evaluation")
    g.add_argument("--codec", default=None,
                   help="codec spec (faiss factory string, extended): PQm, PQmxb, PQmx4fs, OPQm,PQm, RQmxb, "
                        "LSQmxb, SQ4/6/8, SQfp16, SQbf16, RaBitQ, BIN, MRLn,<codec>..., or auto (with "
                        "--max-bytes or --min-recall) "
                        + ("(default: PQm with m = dim/8: PQ48 at 384-d)" if demo
                           else "(default: PQm with m = dim/4, at most 64 bytes)"))
    g.add_argument("--max-bytes", type=int, default=None, metavar="B",
                   help="advisor: sweep candidate codecs, keep the best recall@10 within B bytes per vector")
    g.add_argument("--min-recall", type=float, default=None, metavar="R",
                   help="advisor: sweep candidate codecs, keep the fewest bytes reaching recall@10 R")
    g.add_argument("--advise-rerank", type=int, default=0, choices=[0, 1, 2, 4, 10], metavar="r",
                   help="advisor: judge recall@10 after exact re-ranking of r x 10 candidates (1, 2, 4, 10)")
    g.add_argument("--advise-codecs", default=None, metavar="SPECS",
                   help="advisor: ';'-separated candidates (default: the default grid within the budget)")
    g.add_argument("--metric", choices=["l2", "ip", "cosine"], default="cosine" if demo else "l2",
                   help="distance the codes are searched with; cosine = normalise then inner product "
                        "(default: %(default)s)")
    g.add_argument("--num-train", type=int, default=100_000, help="training-sample size (default: %(default)s)")
    g.add_argument("--num-queries", type=int, default=1_000,
                   help="held-out query vectors for evaluation, never trained on (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seeds sampling and training (default: %(default)s)")
    g.add_argument("--sample-row-groups", type=int, default=1024, metavar="N",
                   help="most Parquet row groups the sample reads, chosen at random; rows are drawn uniformly "
                        "within them. 0 = no limit: exactly uniform rows, which touches nearly every row group "
                        "once the sample outnumbers them (default: %(default)s)")
    g.add_argument("--eval-k", type=int, default=100, help="exact neighbours per query (default: %(default)s)")
    g.add_argument("--rerank-codec", default=None, metavar="SPEC",
                   help="also store a warm column with this codec (e.g. SQ8, SQfp16) for re-ranking without "
                        "the source; costs its bytes per vector (default: none)")
    g.add_argument("--no-eval-rerank", dest="eval_rerank", action="store_false",
                   help="skip measuring recall after exact re-ranking (it reads candidates' vectors back)")
    g = p.add_argument_group("nightly runs")
    g.add_argument("--mode", choices=["auto", "full"], default="auto",
                   help="auto: extend the table's latest version when possible (only new/rewritten files "
                        "encoded, deleted ones dropped); full: rebuild everything (default: %(default)s)")
    g.add_argument("--drift-threshold", type=float, default=0.10,
                   help="retrain when the reconstruction error on fresh data grew by more than this fraction "
                        "(default: %(default)s)")
    g.add_argument("--force-retrain", action="store_true", help="retrain and re-encode everything")
    g.add_argument("--gate-min-recall", type=float, default=None, metavar="R",
                   help="tag the version 'production' only if recall@10 >= R (default: no floor)")
    g.add_argument("--gate-max-drop", type=float, default=0.02, metavar="D",
                   help="... and recall@10 is at most D below the production version's (default: %(default)s)")
    g.add_argument("--keep-versions", type=int, default=20,
                   help="versions kept (tagged versions are never removed; 0 = all) (default: %(default)s)")
    g = p.add_argument_group("execution")
    g.add_argument("--batch-size", type=int, default=0,
                   help="rows per batch in a worker; bounds worker memory. 0 = automatic: about 24 MiB of "
                        "vectors on CPUs (16,384 rows at 384-d), 65,536 rows for GPU encoders (default: %(default)s)")
    g.add_argument("--shard-rows", type=int, default=500_000,
                   help="rows per shard, the unit of parallel work (default: %(default)s)")
    g.add_argument("--ngpu", type=int, default=-1,
                   help="GPUs to use, -1 = all: faiss training, and one encoder actor per GPU on a Ray "
                        "cluster with GPUs. On a cluster joined by address, N actors are asked for even "
                        "beyond the GPUs it has now (an autoscaler adds them) and awaited up to "
                        "$VECPRESS_GPU_WAIT_S seconds, 600 by default (default: %(default)s)")
    g.add_argument("--device", default="auto",
                   help="where workers encode and compute exact neighbours without GPU actors: auto (a GPU "
                        "when CuPy sees one), cuda[:N] (an error where a worker sees no such GPU) or cpu; cpu "
                        "also turns GPU actors off (default: %(default)s)")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray)")
    g.add_argument("--no-prefect", action="store_true",
                   help="run the stages directly instead of as a Prefect flow")
    g.add_argument("--json", action="store_true", help="print the new version's inspect object as JSON")


def _flow_kwargs(args, inputs: list[str], out: str, **extra) -> dict:
    return dict(inputs=inputs, out=out, table=args.table, codec=args.codec, metric=args.metric,
                num_train=args.num_train, num_queries=args.num_queries, seed=args.seed, eval_k=args.eval_k,
                sample_row_groups=args.sample_row_groups, batch_size=args.batch_size, shard_rows=args.shard_rows,
                ngpu=args.ngpu, device=args.device,
                rerank_codec=args.rerank_codec, eval_rerank=args.eval_rerank, max_bytes=args.max_bytes,
                min_recall=args.min_recall, advise_rerank=args.advise_rerank,
                advise_codecs=_specs(args.advise_codecs), mode=args.mode, drift_threshold=args.drift_threshold,
                force_retrain=args.force_retrain, gate_min_recall=args.gate_min_recall,
                gate_max_drop=args.gate_max_drop, keep_versions=args.keep_versions, ray_address=args.ray_address,
                **extra)


def _run(kwargs: dict, no_prefect: bool) -> dict:
    """Run the compress job (as the Prefect flow, or directly) and return its run report."""
    if no_prefect:
        from vecpress.flows.locking import table_lock
        from vecpress.pipeline.distributed import RayExecutor
        from vecpress.pipeline.job import RunContext, check_gate, run_stages, specs_from_params
        from vecpress.pipeline.report import run_report

        source, opts = specs_from_params(kwargs)
        ctx = RunContext.new(kwargs["out"], kwargs["table"])
        with table_lock(ctx.out, kwargs["table"], run_id=ctx.run_id), RayExecutor(kwargs.get("ray_address")) as ex:
            result = run_stages(ctx, source, opts, ex)
        report = run_report(ctx.out, kwargs["table"], result)
        check_gate(result)
        return report
    from vecpress.flows.compress import compress_flow

    _quiet_prefect_console(quiet=log.level >= logging.WARNING)

    return compress_flow(**kwargs)


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
    if run.get("drift"):
        parts.append(f"drift: {run['drift']['reason']}")
    if run.get("gate"):
        parts.append(f"gate: {run['gate']['reason']}")
    return "; ".join(parts)


def cmd_demo(args) -> None:
    from vecpress.pipeline import storage
    from vecpress.pipeline.demo import corpus_parameters, demo_codec, write_corpus, written_corpus

    src = storage.join(args.out, "source")
    wanted = corpus_parameters(args.rows, args.dim, args.files, args.seed)
    if written_corpus(src) == wanted:
        log.info("using the sample corpus already in %s", src)
    else:  # none yet, or made with other --rows/--dim/--files/--seed
        write_corpus(src, num_rows=args.rows, dim=args.dim, num_files=args.files, seed=args.seed)
    if args.codec is None:
        args.codec = demo_codec(args.dim)
    kwargs = _flow_kwargs(args, [src], args.out, keep=["text"], allow_schema_change=True)
    kwargs.update(mode="full", gate_max_drop=1.0)  # every demo run rebuilds and shows its numbers
    info = _run(kwargs, args.no_prefect)
    _print_result(info, args.json)
    if not args.json:
        print(f"\nquery it: python -c \"import lancedb; print(lancedb.connect('{args.out}')"
              f".open_table('{args.table}').search().where('id < 5').to_pandas())\"")


def cmd_compress(args) -> None:
    *inputs, out = args.paths
    if not inputs:
        raise VecpressError("compress needs at least one input and an output: vecpress compress INPUT... OUT")
    info = _run(_flow_kwargs(args, inputs, out, vector_column=args.vector_column, id_column=args.id_column,
                             keep=_csv(args.keep), allow_schema_change=args.allow_schema_change), args.no_prefect)
    _print_result(info, args.json)


def cmd_inspect(args) -> None:
    from vecpress.pipeline.report import inspect_table

    _print_result(inspect_table(args.out, args.table, args.version), args.json)


def cmd_evaluate(args) -> None:
    from vecpress.pipeline.distributed import RayExecutor
    from vecpress.pipeline.job import evaluate_version
    from vecpress.pipeline.lance_io import require_dataset
    from vecpress.pipeline.report import rerank_source

    version = require_dataset(args.out, args.table, args.version).version
    with RayExecutor(args.ray_address) as ex:
        ev = evaluate_version(args.out, args.table, version, ex, k=args.k, rerank=args.rerank, recompute=True)
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
    from vecpress.pipeline.lance_io import require_dataset, version_manifest
    from vecpress.pipeline.search import read_query_vectors, search

    m = version_manifest(require_dataset(args.out, args.table, args.version))
    xq = read_query_vectors(args.queries, args.query_column or m["source"]["vector_column"], m["dim"])
    result = search(args.out, args.table, xq, args.k, rerank=args.rerank, rerank_from=args.rerank_from,
                    version=args.version)
    if args.json:
        for row in result.to_pylist():
            print(json.dumps(row, default=str))
    else:
        print(result.to_pandas().to_string(index=False))


def cmd_sweep(args) -> None:
    from vecpress.pipeline.distributed import RayExecutor
    from vecpress.pipeline.source import SourceSpec
    from vecpress.pipeline.sweep import markdown_table, sweep_corpus

    source = SourceSpec(tuple(args.inputs), args.vector_column, args.id_column)
    try:
        budgets = [int(b) for b in _csv(args.budgets)] if args.budgets else None
    except ValueError:
        raise VecpressError(f"--budgets takes comma-separated byte counts (e.g. 16,32,64), got {args.budgets!r}") from None
    with RayExecutor(args.ray_address) as ex:
        result, uris = sweep_corpus(source, args.out, metric=args.metric, codecs=_specs(args.codecs), budgets=budgets,
                                    num_train=args.num_train, num_queries=args.num_queries, seed=args.seed,
                                    eval_k=args.eval_k, batch_size=args.batch_size, shard_rows=args.shard_rows,
                                    ngpu=args.ngpu, sample_row_groups=args.sample_row_groups, executor=ex)
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

    *inputs, out = args.paths
    if not inputs:
        raise VecpressError("schedule needs at least one input and an output: vecpress schedule INPUT... OUT")
    if args.no_prefect:
        raise VecpressError("schedule serves a Prefect flow; --no-prefect cannot be used with it")
    kwargs = _flow_kwargs(args, inputs, out, vector_column=args.vector_column, id_column=args.id_column,
                          keep=_csv(args.keep) or None, allow_schema_change=args.allow_schema_change)
    if args.print_parameters:
        print(json.dumps(nightly_parameters(**kwargs), indent=1))
        return
    log.info("serving the nightly deployment of table %r (%s %s); Ctrl-C stops it", args.table, args.cron, args.timezone)
    serve_nightly(cron=args.cron, timezone=args.timezone, name=args.name, **kwargs)


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
    _add_compress_options(d, demo=True)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("compress", help="compress Parquet files into a new version of a Lance table")
    c.add_argument("paths", nargs="+", metavar="INPUT... OUT",
                   help="Parquet files/folders (local or URIs like s3://bucket/prefix), then the output folder")
    c.add_argument("--table", required=True, help="output table name (OUT/<table>.lance)")
    _add_source_options(c)
    _add_compress_options(c)
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser("inspect", help="describe a table version and its evaluation")
    i.add_argument("out", help="output folder")
    i.add_argument("--table", required=True)
    i.add_argument("--version", type=_version, default=None, help="version number or tag, e.g. production "
                   "(default: latest)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("evaluate", help="re-measure a version's recall by searching its stored codes (the "
                                        "run measured it while encoding; this reads the codes and the source back)")
    e.add_argument("out", help="output folder")
    e.add_argument("--table", required=True)
    e.add_argument("--version", type=_version, default=None, help="version number or tag (default: latest)")
    e.add_argument("-k", type=int, default=None, help="results per query, at most the run's --eval-k (default: it)")
    e.add_argument("--no-rerank", dest="rerank", action="store_false",
                   help="skip the re-ranked recall (it reads the candidates' vectors back)")
    e.add_argument("--ray-address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else local)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("search", help="top-k ids for query vectors, by asymmetric distance over the codes")
    s.add_argument("out", help="output folder")
    s.add_argument("--table", required=True)
    s.add_argument("--queries", required=True, help="Parquet file/folder of query vectors")
    s.add_argument("--query-column", default=None, help="vector column in the queries (default: the table's)")
    s.add_argument("-k", type=int, default=10, help="results per query (default: %(default)s)")
    s.add_argument("--rerank", type=int, default=0, metavar="R",
                   help="re-rank R x k candidates exactly against the source vectors (default: off)")
    s.add_argument("--rerank-from", choices=["auto", "source", "column"], default="auto",
                   help="where re-rank vectors come from: the warm column, the source Parquet, or auto "
                        "(the warm column when the table has one) (default: %(default)s)")
    s.add_argument("--version", type=_version, default=None, help="version number or tag (default: latest)")
    s.add_argument("--json", action="store_true", help="one JSON object per result line")
    s.set_defaults(func=cmd_search)

    w = sub.add_parser("sweep", help="measure a grid of codecs on your data: bytes, recall, error, speed")
    w.add_argument("inputs", nargs="+", metavar="INPUT", help="Parquet files/folders or URIs")
    w.add_argument("--out", required=True, help="folder for sweep.json, sweep.md and sweep.png")
    w.add_argument("--codecs", default=None, metavar="SPECS",
                   help="';'-separated codec specs (default: a grid covering 8..256 bytes per vector)")
    w.add_argument("--budgets", default=None, metavar="B,B,...",
                   help="byte budgets: narrows the grid to the largest and reports the best codec within each")
    w.add_argument("--vector-column", default=None, help="vector column (default: the only float-list column)")
    w.add_argument("--id-column", default="id", help="id column (default: %(default)s)")
    w.add_argument("--metric", choices=["l2", "ip", "cosine"], default="l2", help="(default: %(default)s)")
    w.add_argument("--num-train", type=int, default=100_000, help="training-sample size (default: %(default)s)")
    w.add_argument("--num-queries", type=int, default=1_000, help="held-out queries (default: %(default)s)")
    w.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    w.add_argument("--sample-row-groups", type=int, default=1024, metavar="N",
                   help="most row groups the sample reads, as in compress (default: %(default)s)")
    w.add_argument("--eval-k", type=int, default=100, help="exact neighbours per query (default: %(default)s)")
    w.add_argument("--batch-size", type=int, default=0,
                   help="rows per batch; 0 = about 24 MiB of vectors (default: %(default)s)")
    w.add_argument("--shard-rows", type=int, default=500_000, help="rows per shard (default: %(default)s)")
    w.add_argument("--ngpu", type=int, default=-1, help="GPUs for training (default: %(default)s)")
    w.add_argument("--ray-address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else local)")
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
    _add_source_options(n)
    _add_compress_options(n)
    n.set_defaults(func=cmd_schedule)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s vecpress %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    logging.getLogger("faiss").setLevel(logging.WARNING)
    # Ray starts its processes with fork+exec; lance/lancedb warn about fork-safety in general
    warnings.filterwarnings("ignore", message=".*not fork-safe.*")
    warnings.filterwarnings("ignore", message=".*fork support is experimental.*")
    try:
        args.func(args)
    except VecpressError as exc:
        print(f"vecpress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vecpress: interrupted; a run stopped before its commit commits nothing (one stopped after it "
              "is evaluated and gated by the next run)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What each run did, as Prefect artifacts: a Markdown report and a table of key figures.

`render_run_report` and `report_rows` are pure (a dict in, Markdown or rows out) and work without
Prefect; `publish_run_report` turns them into artifacts when called inside a flow run. Both
artifacts are keyed by table (`vecpress-<table>` and `vecpress-<table>-figures`), so the
Prefect UI's Artifacts page shows one history per table, one version per night.

The report dict is `vecpress inspect --json`'s object plus a `run` section (see
`render_run_report`); every key may be missing or None when it does not apply.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

log = logging.getLogger("vecpress")


def artifact_key(table: str, suffix: str = "") -> str:
    """`vecpress-<table>[-suffix]`, only [a-z0-9-] (Prefect's rule for keys). A table name that
    needs changing for that (capitals, "_") also gets 6 hex digits of its hash, so "a_b", "A-b"
    and "a-b" keep separate report histories."""
    name = str(table or "table")
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "table"
    if slug != name:
        slug += "-" + hashlib.sha256(name.encode()).hexdigest()[:6]
    key = f"vecpress-{slug}" + (f"-{suffix}" if suffix else "")
    return re.sub(r"-{2,}", "-", key)


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        return f"{v:.{digits}g}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _rows(pairs: list[tuple[str, Any]]) -> list[str]:
    return ["| figure | value |", "| --- | --- |"] + [f"| {k} | {_fmt(v)} |" for k, v in pairs]


def _outcome(report: dict) -> str:
    run = report.get("run") or {}
    committed = run.get("committed")
    reason = run.get("reason")
    version = report.get("version")
    if committed is False:
        head = "**no new version**"
    elif committed is True or version is not None:
        head = f"**committed version {_fmt(version)}**"
    else:
        head = "**outcome unknown**"
    return head + (f" ({_fmt(reason)})" if reason else "")


def report_rows(report: dict) -> list[dict]:
    """The key figures as `{"figure", "value"}` rows (the table artifact)."""
    report = report or {}
    run = report.get("run") or {}
    drift = run.get("drift") or {}
    gate = run.get("gate") or {}
    ev = report.get("eval") or {}
    pairs = [
        ("table", report.get("table")),
        ("version", report.get("version")),
        ("committed", run.get("committed")),
        ("reason", run.get("reason")),
        ("mode", run.get("mode")),
        ("rows", report.get("num_rows")),
        ("rows added", run.get("rows_added")),
        ("rows removed", run.get("rows_removed")),
        ("codec", report.get("codec")),
        ("code bytes per vector", report.get("code_bytes")),
        ("source bytes per vector", report.get("source_bytes")),
        ("compression ratio", report.get("compression_ratio")),
        ("recall@1", ev.get("recall_at_1")),
        ("recall@10", ev.get("recall_at_10")),
        ("recall@100", ev.get("recall_at_100")),
        ("relative error", ev.get("relative_error")),
        ("drift relative error", drift.get("relative_error")),
        ("drift baseline relative error", drift.get("baseline_relative_error")),
        ("drift retrain", drift.get("retrain")),
        ("gate passed", gate.get("passed")),
        ("gate reason", gate.get("reason")),
    ]
    return [{"figure": k, "value": v if isinstance(v, (int, float, str, bool)) or v is None else str(v)}
            for k, v in pairs]


def render_run_report(report: dict) -> str:
    """A Markdown report of one run: outcome, data and bytes, changes, quality, drift, gate, times.

    Shape (all optional): table, version, num_rows, dim, metric, codec, code_bytes, source_bytes,
    compression_ratio; eval {num_queries, recall_at_1/10/100, relative_error, rerank {r: {recall_at_10}}};
    run {run_id, committed, reason, mode, rows_added, rows_removed, files_added/removed/rewritten/
    unchanged, drift {measured, relative_error, baseline_relative_error, recall_at_10,
    baseline_recall_at_10, retrain, reason}, gate {passed, recall_at_10, floor,
    previous_recall_at_10, max_drop, tag, tagged_version, reason}, stage_seconds {stage: s}}.
    """
    report = report or {}
    run = report.get("run") or {}
    lines = [f"# vecpress: table `{_fmt(report.get('table'))}`", "", _outcome(report)]
    if run.get("run_id"):
        lines += ["", f"Run `{_fmt(run['run_id'])}`" + (f", mode {_fmt(run.get('mode'))}" if run.get("mode") else "")]

    data = [("rows", report.get("num_rows")), ("dim", report.get("dim")), ("metric", report.get("metric")),
            ("codec", report.get("codec")), ("code bytes per vector", report.get("code_bytes")),
            ("source bytes per vector", report.get("source_bytes")),
            ("compression ratio", report.get("compression_ratio"))]
    if any(v is not None for _, v in data):
        lines += ["", "## Data", ""] + _rows(data)

    changes = [(k.replace("_", " "), run.get(k)) for k in
               ("rows_added", "rows_removed", "rows_reencoded", "files_added", "files_removed", "files_rewritten",
                "files_unchanged")]
    if any(v is not None for _, v in changes):
        lines += ["", "## Changes", ""] + _rows(changes)

    ev = report.get("eval")
    if isinstance(ev, dict):
        quality = [("queries", ev.get("num_queries")), ("recall@1", ev.get("recall_at_1")),
                   ("recall@10", ev.get("recall_at_10")), ("recall@100", ev.get("recall_at_100")),
                   ("relative error", ev.get("relative_error"))]
        rerank = ev.get("rerank") or {}
        if isinstance(rerank, dict):
            for r in sorted(rerank, key=lambda r: float(r) if str(r).replace(".", "", 1).isdigit() else 1e9):
                quality.append((f"recall@10 re-ranked x{r}", _get(rerank, str(r), "recall_at_10")))
        lines += ["", "## Quality", ""] + _rows(quality)
    elif report.get("version") is not None:
        lines += ["", "## Quality", "", "not evaluated"]

    drift = run.get("drift")
    if isinstance(drift, dict):
        lines += ["", "## Drift", ""]
        if drift.get("measured") is False:
            lines.append(f"not measured ({_fmt(drift.get('reason'))})" if drift.get("reason") else "not measured")
        else:
            lines += _rows([("relative error", drift.get("relative_error")),
                            ("baseline relative error", drift.get("baseline_relative_error")),
                            ("recall@10", drift.get("recall_at_10")),
                            ("baseline recall@10", drift.get("baseline_recall_at_10")),
                            ("retrain", drift.get("retrain")), ("reason", drift.get("reason"))])

    gate = run.get("gate")
    if isinstance(gate, dict):
        verdict = {True: "passed", False: "**FAILED**"}.get(gate.get("passed"), "not decided")
        lines += ["", "## Quality gate", "", f"Gate {verdict}" + (f": {_fmt(gate.get('reason'))}" if gate.get("reason") else ""),
                  ""]
        lines += _rows([("recall@10", gate.get("recall_at_10")), ("floor", gate.get("floor")),
                        ("previous recall@10", gate.get("previous_recall_at_10")), ("max drop", gate.get("max_drop")),
                        ("tag", gate.get("tag")), ("tagged version", gate.get("tagged_version"))])

    times = run.get("stage_seconds")
    if isinstance(times, dict) and times:
        lines += ["", "## Stage times (s)", ""] + _rows([(str(k), v) for k, v in times.items()])
    return "\n".join(lines) + "\n"


def publish_run_report(report: dict) -> None:
    """Create the Markdown and table artifacts for this run; a no-op outside a Prefect flow run.

    Artifacts are a report, not a result: failing to publish logs a warning and never fails the
    run (the version is already committed when this is called).
    """
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        log.debug("not in a Prefect flow run: no artifacts published")
        return
    table = (report or {}).get("table")
    run = (report or {}).get("run") or {}
    summary = f"vecpress {table}: " + _outcome(report or {}).replace("*", "")
    try:
        create_markdown_artifact(markdown=render_run_report(report), key=artifact_key(table), description=summary)
        create_table_artifact(table=report_rows(report), key=artifact_key(table, "figures"),
                              description=f"{summary}; run {run.get('run_id') or '-'}")
    except Exception as exc:
        log.warning("could not publish the run report for table %r to Prefect: %s", table, exc)

"""What a version holds and how good it is: the evaluation sidecar (JSON per version and a
LanceDB table `<table>_eval`), the `inspect` object and the human summary."""

from __future__ import annotations

import json
import logging

import lancedb
import pyarrow as pa

from vecpress.pipeline import storage
from vecpress.pipeline.lance_io import (
    open_lance, require_dataset, sidecar_uri, table_uri, version_manifest, version_ref,
)
from vecpress.pipeline.schema import EVAL_TABLE_SUFFIX
from vecpress.pipeline.served import index_info

log = logging.getLogger("vecpress")


def stored_bytes(manifest: dict) -> int:
    """Bytes per vector the output stores: its codes, or (a LanceDB-served table) the vectors
    and the index's codes."""
    return manifest["code_bytes"] + (manifest.get("vector_bytes") or 0)


def eval_uri(out: str, table: str, version: int | str) -> str:
    """A version's evaluation JSON: by number, or by its tag for a version on another branch
    (a codes table's failed version: pipeline.gated)."""
    return storage.join(sidecar_uri(out, table), "eval", f"version-{version}.json")


def store_eval(out: str, table: str, version: int | str, manifest: dict, ev: dict, stage_seconds: dict) -> dict:
    """Write the evaluation of `version` as JSON and as a row of the LanceDB eval table
    (replacing an earlier row for the same version). A version on another branch (`version`
    its tag) gets the JSON only: the table's rows are the main branch's versions."""
    source_bytes, code_bytes = manifest["source_bytes"], stored_bytes(manifest)
    ev = {
        "table": table, "version": version, "run_id": manifest["run_id"], "codec": manifest["codec"]["spec"],
        "metric": manifest["metric"], "num_rows": manifest["num_rows"], **ev,
        "source_bytes": source_bytes, "code_bytes": code_bytes,
        "compression_ratio": round(source_bytes / code_bytes, 3), "stage_seconds": stage_seconds,
    }
    storage.write_bytes(eval_uri(out, table, version), json.dumps(ev, indent=1).encode())
    if isinstance(version, str):
        return ev
    row = {k: v for k, v in ev.items() if k not in ("stage_seconds", "rerank")}
    row["stage_seconds"] = json.dumps(stage_seconds)
    row["rerank"] = json.dumps(ev.get("rerank"))
    schema = pa.schema([
        ("table", pa.string()), ("version", pa.int64()), ("run_id", pa.string()), ("codec", pa.string()),
        ("metric", pa.string()), ("num_rows", pa.int64()), ("num_queries", pa.int64()), ("k", pa.int64()),
        ("exclude_self", pa.bool_()), ("recall_at_1", pa.float64()), ("recall_at_10", pa.float64()),
        ("recall_at_100", pa.float64()), ("relative_error", pa.float64()), ("source_bytes", pa.int64()),
        ("code_bytes", pa.int64()), ("compression_ratio", pa.float64()), ("stage_seconds", pa.string()),
        ("rerank_from", pa.string()), ("rerank", pa.string()),
    ])
    data = pa.Table.from_pylist([row], schema=schema)
    target, options = storage.lance_location(out)
    db = lancedb.connect(target, storage_options=options)
    name = table + EVAL_TABLE_SUFFIX
    with storage.writing(storage.join(out, f"{name}.lance"), "the evaluation table"):
        if name in db.list_tables().tables:
            t = db.open_table(name)
            t.delete(f"version = {int(version)}")
            t.add(data)
        else:
            db.create_table(name, data)
    return ev


def store_gate(out: str, table: str, version: int | str, gate: dict) -> None:
    """Add the quality-gate decision to a version's evaluation JSON."""
    ev = load_eval(out, table, version) or {}
    storage.write_bytes(eval_uri(out, table, version), json.dumps({**ev, "gate": gate}, indent=1).encode())


def run_report(out: str, table: str, result) -> dict:
    """What a run did, for logs and Prefect artifacts: the version's inspect object plus `run`."""
    ref = (result.gate or {}).get("failed_tag") or result.version
    info = inspect_table(out, table, ref) if ref is not None else {"table": table}
    return {**info, "run": result.summary()}


def load_eval(out: str, table: str, version: int | str) -> dict | None:
    uri = eval_uri(out, table, version)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def source_files(out: str, manifest: dict) -> dict:
    """A version's source: its files (every file read, from the run's plan), and those read
    through a symbolic link (--follow-links) or reached twice and read once."""
    src = manifest["source"]
    info = {k: src[k] for k in ("num_files", "vector_type", "uris")}
    plan_uri = storage.join(storage.normalize(out), src["plan_uri"])
    plan = json.loads(storage.read_bytes(plan_uri)) if storage.exists(plan_uri) else {}
    info["files"] = [f["uri"] for f in plan["files"]] if "files" in plan else src["uris"]
    info["links"] = [list(p) for p in plan.get("links", src.get("links", []))]
    info["aliases"] = [list(p) for p in plan.get("aliases", src.get("aliases", []))]
    return info


def inspect_table(out: str, table: str, version: int | str | None = None) -> dict:
    """One JSON-able object describing a version (default: the one readers get, production):
    size, codec, source and its evaluation."""
    ds = require_dataset(out, table, version)
    m = version_manifest(ds)
    base = storage.normalize(out)
    ref = version_ref(ds, version)
    ev = load_eval(out, table, ref)
    tags = ds.tags.list()
    branch = (tags.get(ref) or {}).get("branch") if isinstance(ref, str) else None
    return {
        "table": table,
        "uri": table_uri(out, table),
        "version": ds.version,
        "latest_version": ds.latest_version if branch is None else _main_latest(out, table),
        "num_rows": ds.count_rows(),
        "dim": m["dim"],
        "metric": m["metric"],
        "codec": m["codec"]["spec"],
        "codec_uri": storage.join(base, m["codec"]["uri"]),
        "codec_sha256": m["codec"]["sha256"],
        "code_bytes": m["code_bytes"],
        "source_bytes": m["source_bytes"],
        "compression_ratio": round(m["source_bytes"] / stored_bytes(m), 3),
        "serve": m.get("serve", "codes"),
        "vector_bytes": m.get("vector_bytes"),
        "index": index_info(ds, m["source"]["vector_column"]) if m.get("serve") == "lancedb" else None,
        "run_id": m["run_id"],
        "created_at": m["created_at"],
        "id_column": m["source"]["id_column"],
        "vector_column": m["source"]["vector_column"],
        "keep": m["source"]["keep"],
        "source": source_files(out, m),
        "sample": {k: m["sample"][k] for k in ("seed", "num_train", "num_queries")},
        "stage_seconds": (ev or {}).get("stage_seconds", m.get("stage_seconds")),
        "tags": sorted(name for name, t in tags.items() if t["version"] == ds.version and t.get("branch") == branch),
        "branch": branch,
        "mode": m.get("mode", "full"),
        "incremental": m.get("incremental"),
        "drift": m.get("drift"),
        "gate": (ev or {}).get("gate"),
        "rerank_codec": (m.get("rerank_codec") or {}).get("spec"),
        "rerank_bytes": m.get("rerank_bytes"),
        "advisor": m.get("advisor"),
        "devices": m.get("devices"),
        "id_check": m.get("id_check"),
        "partitions": None if not m.get("partitions") else {k: m["partitions"].get(k) for k in (
            "nlist", "default_nprobes", "sizes", "exhaustive", "grid", "residual")},
        "eval": None if ev is None else {k: ev.get(k) for k in (
            "num_queries", "k", "exclude_self", "recall_at_1", "recall_at_10", "recall_at_100", "relative_error",
            "rerank_from", "rerank", "searched", "served")},
    }


def _main_latest(out: str, table: str) -> int:
    """The main branch's latest version (a version on another branch counts its own)."""
    return open_lance(table_uri(out, table)).version


def served_lines(served: dict | None) -> list[str]:
    """LanceDB's search over a served version: recall@10 and p50 latency over the grid, and the
    cheapest setting per recall target."""
    if not served:
        return []
    d = served["defaults"]
    lines = [f"LanceDB search  defaults: recall@10 {d['recall_at_10']:.3f}, p50 {d['p50_ms']:.1f} ms; "
             "nprobes x refine_factor: recall@10 (p50 ms)"]
    by_nprobes: dict = {}
    for g in served["grid"]:
        by_nprobes.setdefault(g["nprobes"], []).append(
            f"r={g['refine_factor'] or '-'} {g['recall_at_10']:.3f} ({g['p50_ms']:.1f})")
    lines += [f"  nprobes {n:<6}{'  '.join(cells)}" for n, cells in by_nprobes.items()]
    for target, g in served["cheapest"].items():
        lines.append(f"  recall@10 >= {target}: " + ("not reached on the grid" if g is None else
                     f"nprobes {g['nprobes']}, refine_factor {g['refine_factor']} ({g['recall_at_10']:.3f}, "
                     f"{g['p50_ms']:.1f} ms)"))
    return lines


def partition_lines(partitions: dict | None) -> list[str]:
    """A codes table's partitions: the default nprobes, and recall@10 (p50 ms of one query)
    along the grid its run measured, against scoring every code."""
    if not partitions:
        return []
    every = (partitions.get("exhaustive") or {}).get("recall_at_10")
    sizes = partitions["sizes"]
    cells = [f"{g['nprobes']}: {g['recall_at_10']:.3f} ({g['p50_ms']:.1f})" for g in partitions["grid"]]
    residual = ", residual codes" if partitions.get("residual") else ""
    exhaustive = "" if every is None else f" (the table's codes, every one scored: recall@10 {every:.3f})"
    return [f"partitions      {partitions['nlist']} ({sizes['min']:,}..{sizes['max']:,} rows each); a query probes "
            f"{partitions['default_nprobes']} by default{residual}{exhaustive}",
            "  nprobes: recall@10 (p50 ms)  " + "  ".join(cells)]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def rerank_source(rerank_from: str | None) -> str:
    """Where a re-ranking's distances came from, in words."""
    if rerank_from == "column":
        return "distances to the warm column's decoded codes"
    return f"exact distances from the {rerank_from}"


def summary_table(info: dict) -> str:
    """A short human summary of `inspect_table` output."""
    ev = info.get("eval") or {}
    rows = info["num_rows"]
    src = info.get("source") or {}

    def r(k):
        v = ev.get(f"recall_at_{k}")
        return "n/a" if v is None else f"{v:.3f}"

    lines = [
        f"table           {info['table']} (version {info['version']}) at {info['uri']}",
        f"rows            {rows:,} x {info['dim']}-d, metric {info['metric']}",
        f"codec           {info['codec']}",
        f"bytes before    {_human_bytes(rows * info['source_bytes'])} ({info['source_bytes']} B/vector)",
        f"bytes after     {_human_bytes(rows * stored_bytes(info))} ({stored_bytes(info)} B/vector"
        + (f": {info['vector_bytes']} B of vectors + {info['code_bytes']} B of index codes)" if info.get("vector_bytes")
           else ")"),
        f"ratio           {info['compression_ratio']:.1f}x",
        f"source          {len(src.get('files') or [])} files" + (f", {len(src['links'])} read through links"
                                                                  if src.get("links") else "")
        + (f", {len(src['aliases'])} second names of a file read once" if src.get("aliases") else ""),
        f"recall@1/10/100 {r(1)} / {r(10)} / {r(100)}  ({ev.get('num_queries', 0)} held-out queries)",
        f"relative error  {ev['relative_error']:.4f}" if ev else "relative error  n/a (not evaluated)",
    ]
    if ev.get("rerank"):
        parts = [f"r={r} {v['recall_at_10']:.3f}" for r, v in ev["rerank"].items() if v.get("recall_at_10") is not None]
        lines.append(f"re-ranked @10   {'  '.join(parts)}  ({rerank_source(ev['rerank_from'])})")
    if info.get("rerank_codec"):
        lines.insert(5, f"warm column     {info['rerank_codec']} ({info['rerank_bytes']} B/vector, for re-ranking)")
    if info.get("serve") == "lancedb":
        index = info.get("index") or {}
        lines[2] = (f"served by       LanceDB: {index.get('type', 'IVF_PQ')} {info['codec']} over column "
                    f"{info['vector_column']}" + ("" if index.get("covers_all_rows") else
                                                  " (its index does not cover every row: this version is not served)"))
        lines += served_lines(ev.get("served"))
    lines += partition_lines(info.get("partitions"))
    devices = info.get("devices") or {}
    if devices.get("compute"):
        where = sorted({f"{c.get('encode')} ({c['gpu_name']})" if c.get("gpu_name") else str(c.get("encode"))
                        for c in devices["compute"]})
        knn = sorted({str(c.get("exact_knn")) for c in devices["compute"]})
        found = sorted({str(c["code_search"]) for c in devices["compute"] if c.get("code_search")})
        lines.append(f"encoded on      {', '.join(where)} by {devices['placement']}; exact neighbours on {', '.join(knn)}"
                     + (f"; search over the codes on {', '.join(found)}" if found else ""))
    advisor = info.get("advisor")
    if advisor:
        crit = {k: v for k, v in advisor["criterion"].items() if v}
        first = advisor.get("decided_in") == "first stage"
        lines.append(f"advisor         chose {advisor['chosen']} ({', '.join(f'{k} {v}' for k, v in crit.items())}; "
                     f"recall@10 {'at least ' if advisor.get('recall_judged_by') else ''}"
                     f"{advisor['chosen_recall_at_10']:.3f} "
                     f"{'in the first stage' if first else 'on the sample'})")
        stage = advisor.get("first_stage")
        if stage:
            # (a residual quantizer that went on judged by its first stages, not trained whole there)
            by = {r["codec"]: f"judged there by {r['judged_by']}" + (
                f", its next length projected at {r['projected_recall_at_10']:.3f} or more"
                if "projected_recall_at_10" in r else "") for r in stage["rows"] if r.get("judged_by")}
            fewer = advisor.get("trained_on_fewer_rows") or {}  # (the second stage's rows for its kind of codec)
            kept = ", ".join(f"{c} ({by[c]})" if c in by else f"{c} (trained on {fewer[c]:,} rows)"
                             if c in fewer else c for c in stage["kept"])
            swept = advisor.get("swept_rows")
            lines.append(f"                first stage: {len(stage['rows'])} candidates on {stage['train_rows']:,} vectors in "
                         f"{stage['seconds']:.1f}s; " + (f"{advisor['chosen']} {advisor['reason']}" if first else
                                                          f"swept over {f'{swept:,} rows' if swept else 'the corpus'}: "
                                                          f"{kept}"))
        if advisor.get("held_by_finer"):
            lines.append("                not tried, a finer one of the family fits the budget: "
                         + ", ".join(f"{s} ({by})" for s, by in advisor["held_by_finer"].items()))
    if "run" not in info:  # (a run's report says these in its run line)
        if info.get("mode") == "incremental" and info.get("incremental"):
            inc = info["incremental"]
            lines.append(f"incremental     on version {inc.get('previous_version')}: +{inc.get('rows_added', 0):,} "
                         f"rows, -{inc.get('rows_removed', 0):,} rows")
        for name in ("drift", "gate"):
            if info.get(name):
                lines.append(f"{name:<16}{info[name].get('reason')}")
    if info.get("tags"):
        lines.append(f"tags            {', '.join(info['tags'])}")
    times = info.get("stage_seconds") or {}
    if times:
        lines.append("stage seconds   " + "  ".join(f"{k} {v:.1f}" for k, v in times.items()))
    return "\n".join(lines)

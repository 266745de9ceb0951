"""One run per table at a time: a lease file next to the output.

`table_lock(out, table)` holds `OUT/_vecpress/<table>/lock.json` for the duration of a run. The
lease names its holder (run id, host, pid, since when) and an expiry that a heartbeat thread
pushes forward while the holder lives. A second run fails fast with `TableBusyError` naming the
holder (or waits up to `wait_seconds`). A lease whose holder is gone -- a dead pid on this host,
or an expiry in the past (a crashed machine) -- is taken over, so a crash never blocks the next
run for longer than `stale_after_seconds`.

Why a file and not (only) a Prefect global concurrency limit: without `PREFECT_API_URL` every
`vecpress compress` process starts its own temporary Prefect server, so a Prefect-side limit
cannot see the other process; `--no-prefect` has no Prefect at all. The file lives where the
data lives, so every process that can write the table sees it. Scheduled deployments add the
server-side guard on top (`concurrency_limit` in `infra/prefect.yaml`).

Atomicity: on local disks the lease is created with `os.link` of a fully written temporary file
(fails if the lease exists; readers never see a half-written lease), and a stale lease is broken
under a short-lived `O_CREAT|O_EXCL` guard file so two contenders cannot both break it. Object
stores (s3://, gs://) have no create-if-absent through pyarrow: there the lease is write, pause,
read back and compare -- best effort, a narrow race remains; rely on the deployment's
concurrency limit as well when the output is on an object store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from vecpress.pipeline import storage
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.lance_io import sidecar_uri

log = logging.getLogger("vecpress")

LOCK_FILE = "lock.json"
_GUARD_STALE_SECONDS = 60.0  # a takeover guard older than this was left by a crashed contender
_REMOTE_SETTLE_SECONDS = 1.0  # object stores: pause between writing a lease and reading it back


class LeaseLostError(VecpressError):
    """Another run took the table's lease over while this one held it: this run must not commit."""


class TableBusyError(VecpressError):
    """Another run holds the table's lease; nothing was done by this run."""

    def __init__(self, message: str, *, table: str, lock_uri: str, holder: dict):
        super().__init__(message)
        self.table = table
        self.lock_uri = lock_uri
        self.holder = holder


def lock_uri(out: str, table: str) -> str:
    return storage.join(sidecar_uri(out, table), LOCK_FILE)


@dataclass(frozen=True)
class LeaseRef:
    """What a run carries of the lease it holds: enough to check, right before it commits,
    that the lease is still its own (`check_lease`)."""

    table: str
    uri: str
    token: str

    @classmethod
    def of(cls, lease: dict) -> "LeaseRef":
        """The reference to a lease that `table_lock` yields."""
        return cls(lease["table"], lease["uri"], lease["token"])


def check_lease(ref: LeaseRef) -> None:
    """LeaseLostError unless the table's lease file still holds this run's token: a run whose
    lease was taken over (it stalled past the lease's expiry, or someone deleted the lock)
    may overlap another run of the same table, so it must not commit."""
    current = _read(ref.uri)
    if current is None or current.get("token") != ref.token:
        holder = "nobody" if current is None else (f"run {current.get('run_id')} on host {current.get('host')} "
                                                   f"(pid {current.get('pid')})")
        raise LeaseLostError(f"lost the lease of table {ref.table!r} ({ref.uri}), now held by {holder}: "
                             "nothing was committed by this run")


def _now() -> float:
    return time.time()


def _iso(ts: float | None) -> str:
    if ts is None:
        return "?"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    except OSError:
        return True
    if start is not None:
        now_start = _pid_start(pid)
        if now_start is not None and now_start != start:
            return False  # the pid was reused by another process
    return True


def holder_gone(lease: dict, *, now: float | None = None) -> str | None:
    """Why a lease may be taken over ("expired ...", "pid ... is dead"), or None if it is live."""
    now = _now() if now is None else now
    expires = lease.get("expires_at")
    if not isinstance(expires, (int, float)) or expires <= now:
        return f"expired at {_iso(expires if isinstance(expires, (int, float)) else None)}"
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        if not _pid_alive(lease["pid"], lease.get("pid_start")):
            return f"pid {lease['pid']} on {lease['host']} is dead"
    return None


def _busy_error(table: str, uri: str, lease: dict, waited: float) -> TableBusyError:
    held = (f"run {lease.get('run_id')!s} on host {lease.get('host')!s} (pid {lease.get('pid')!s}) "
            f"has held it since {_iso(lease.get('acquired_at'))}, lease expires {_iso(lease.get('expires_at'))}")
    waited_s = f" after waiting {waited:.0f} s" if waited > 0 else ""
    return TableBusyError(
        f"table {table!r} is busy{waited_s}: {held}. Nothing was done by this run. Wait for that run, or, if "
        f"it is gone, delete {uri} (a dead pid on the same host or an expired lease is taken over "
        f"automatically)", table=table, lock_uri=uri, holder=lease)


# ---- the lease file ---------------------------------------------------------------------------

def _read(uri: str) -> dict | None:
    """The lease, None when there is none; an unreadable lease counts as expired."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    except OSError:
        if not storage.exists(uri):
            return None
        raise
    try:
        lease = json.loads(data)
        return lease if isinstance(lease, dict) else {}
    except ValueError:
        return {}  # half-written by a crashed object-store writer: no expiry, so stale


def _is_local(uri: str) -> bool:
    return not storage.resolve(uri).scheme


def _create_local(path: str, data: bytes) -> bool:
    """Create `path` with `data` iff it does not exist; atomic, never half-written."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:  # (a full disk: no half-written file left behind)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive create, then write
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    finally:
        os.unlink(tmp)


@contextmanager
def _takeover_guard(path: str) -> Iterator[bool]:
    """A short-lived exclusive guard while breaking a stale lease (yields False if busy)."""
    guard = path + ".takeover"
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if _now() - os.path.getmtime(guard) > _GUARD_STALE_SECONDS:
                os.unlink(guard)  # left by a contender that crashed mid-takeover
        except FileNotFoundError:
            pass
        yield False
        return
    os.close(fd)
    try:
        yield True
    finally:
        try:
            os.unlink(guard)
        except FileNotFoundError:
            pass


def _try_acquire(uri: str, lease: dict) -> tuple[bool, dict | None]:
    """(acquired, the current holder's lease when not)."""
    data = json.dumps(lease, indent=1).encode()
    if _is_local(uri):
        path = storage.resolve(uri).path
        if _create_local(path, data):
            return True, None
        current = _read(uri)
        if current is None:
            return False, None  # released just now: caller retries at once
        why = holder_gone(current)
        if why is None:
            return False, current
        with _takeover_guard(path) as ours:
            if not ours:
                return False, current
            again = _read(uri)
            if again is not None and again.get("token") == current.get("token"):
                log.warning("taking over the lease of table %r: run %s %s", lease["table"], current.get("run_id"), why)
                os.unlink(path)
        return (True, None) if _create_local(path, data) else (False, _read(uri))
    current = _read(uri)
    if current is not None and holder_gone(current) is None:
        return False, current
    if current is not None:
        log.warning("taking over the lease of table %r: run %s %s", lease["table"], current.get("run_id"),
                    holder_gone(current))
    storage.write_bytes(uri, data)
    time.sleep(_REMOTE_SETTLE_SECONDS)
    current = _read(uri)
    if current is not None and current.get("token") == lease["token"]:
        return True, None
    return False, current


def _write_if_ours(uri: str, lease: dict) -> bool:
    current = _read(uri)
    if current is None or current.get("token") != lease["token"]:
        return False
    storage.write_bytes(uri, json.dumps(lease, indent=1).encode())  # atomic rename on local disks
    return True


def _release(uri: str, token: str) -> None:
    current = _read(uri)
    if current is None or current.get("token") != token:
        log.warning("lease %s was no longer ours at release (taken over?)", uri)
        return
    loc = storage.resolve(uri)
    if loc.scheme:
        loc.fs.delete_file(loc.path)
    else:
        os.unlink(loc.path)


@contextmanager
def table_lock(out: str, table: str, *, wait_seconds: float = 0, stale_after_seconds: float = 6 * 3600,
               run_id: str | None = None, heartbeat_seconds: float | None = None,
               poll_seconds: float = 1.0) -> Iterator[dict]:
    """Hold the table's lease for the `with` block; yields the lease (run_id, host, pid, ...).

    wait_seconds: 0 fails at once with `TableBusyError` when another live run holds the table
        (the default: a second nightly run should not queue behind a slow one); > 0 polls that
        long first.
    stale_after_seconds: lease lifetime without a heartbeat. A live holder renews it every
        `heartbeat_seconds` (default a quarter of it), so it bounds how long a crashed holder on
        another machine blocks the table, not how long a run may take. A dead pid on the same host
        is taken over at once.
    run_id: recorded in the lease for the error message (default: a fresh id).
    """
    if stale_after_seconds <= 0:
        raise VecpressError(f"stale_after_seconds must be > 0, got {stale_after_seconds}")
    uri = lock_uri(out, table)
    now = _now()
    lease = {"table": table, "out": storage.normalize(out), "uri": uri, "run_id": run_id or uuid.uuid4().hex,
             "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
             "acquired_at": now, "renewed_at": now, "expires_at": now + stale_after_seconds,
             "token": uuid.uuid4().hex}
    deadline = now + max(0.0, wait_seconds)
    while True:
        lease["renewed_at"] = _now()
        lease["expires_at"] = lease["renewed_at"] + stale_after_seconds
        with storage.writing(uri, "the table's lease"):
            acquired, holder = _try_acquire(uri, lease)
        if acquired:
            break
        if holder is not None and _now() >= deadline:
            raise _busy_error(table, uri, holder, wait_seconds)
        time.sleep(0 if holder is None else min(poll_seconds, max(0.01, deadline - _now())))
    lease["acquired_at"] = lease["renewed_at"]
    log.info("table %r locked by run %s (%s)", table, lease["run_id"], uri)

    stop = threading.Event()

    def heartbeat() -> None:
        interval = heartbeat_seconds if heartbeat_seconds is not None else stale_after_seconds / 4
        while not stop.wait(interval):
            renewed = dict(lease, renewed_at=_now(), expires_at=_now() + stale_after_seconds)
            try:
                if not _write_if_ours(uri, renewed):
                    log.error("lost the lease of table %r (%s): another run took it over; this run will not "
                              "commit (check_lease)", table, uri)
                    return
                lease.update(renewed_at=renewed["renewed_at"], expires_at=renewed["expires_at"])
            except Exception as exc:  # transient I/O: try again at the next beat
                log.warning("could not renew the lease %s: %s", uri, exc)

    beat = threading.Thread(target=heartbeat, name=f"vecpress-lease-{table}", daemon=True)
    beat.start()
    try:
        yield lease
    finally:
        stop.set()
        beat.join(timeout=10)
        try:
            _release(uri, lease["token"])
        except Exception as exc:  # the lease then expires on its own
            log.warning("could not release the lease %s: %s", uri, exc)

"""Prefect's temporary local server for a flow run from the command line, in a session of its own.

Without PREFECT_API_URL, Prefect starts a temporary server (`SubprocessASGIServer`) on a flow's
first API call, as a child in the command's process group. A terminal's Ctrl-C goes to the whole
group: the server shut down at once while the interrupted flow still reported its crash to it,
and the command retried for minutes, then ended in a traceback. Started here first, in a
session of its own, the same server (Prefect finds it as its one temporary server) outlives the
interrupt; Prefect stops it when the command exits, and `stop_temporary_server` stops it when
the command cannot wait for that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

#: seconds the temporary server gets to finish before it is killed, when the command exits
STOP_SECONDS = 2.0


def start_temporary_server() -> str | None:
    """Start Prefect's temporary server in its own session when a flow run would start one (no
    PREFECT_API_URL, temporary servers allowed); its API URL, else None."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    server = _server_class()()  # (the one instance Prefect's clients use, unless one was started before)
    server.start()
    return server.api_url


def stop_temporary_server() -> None:
    """Ask the temporary server to stop without waiting (an exit that skips Prefect's own stop)."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    process = getattr(server, "server_process", None)
    if process is not None and process.poll() is None:
        process.terminate()


def _stop_with_parent() -> None:
    """In the server's process before it starts (Linux): SIGTERM when the command's process ends
    however it ends (killed, os._exit), as it did in the command's process group."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _server_class():
    from prefect.server.api.server import SubprocessASGIServer

    class TemporaryServerApart(SubprocessASGIServer):
        """Prefect's temporary server, its process in a new session (no terminal signals)."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Prefect 3.8's SubprocessASGIServer._run_uvicorn_command, plus start_new_session
            import prefect
            from prefect.settings import get_current_settings

            env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            return subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **env, **get_current_settings().to_environment_variables(exclude_unset=True)},
                start_new_session=True, preexec_fn=_stop_with_parent if sys.platform == "linux" else None)

        def stop(self) -> None:
            # Prefect's stop waits up to 5 s for the server to finish, and that was most of an
            # interrupted command's exit: wait STOP_SECONDS, then kill it (its SQLite database
            # stays consistent)
            process, self.server_process = self.server_process, None
            if process is not None:
                process.terminate()
                try:
                    process.wait(STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            super().stop()

    return TemporaryServerApart

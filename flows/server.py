"""A local Prefect server for schedules and event triggers, and the environment every Prefect face runs in.

Nothing here imports prefect: Prefect reads its settings when it is first imported, so the environment
(PREFECT_HOME, telemetry off, PREFECT_API_URL) has to be settled before that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from moecl.errors import MoeclError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200


class ServerError(MoeclError):
    """The local Prefect server did not start or is not reachable."""


def prefect_environment(project_root: str | Path) -> dict[str, str]:
    """Defaults for a Prefect process of this project (an explicit setting always wins): history in
    <project>/.prefect, no telemetry, a generous cold-start timeout for the temporary local server."""
    defaults = {
        "PREFECT_HOME": str(Path(project_root).resolve() / ".prefect"),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    }
    applied = {}
    for key, value in defaults.items():
        if not os.environ.get(key):
            os.environ[key] = value
            applied[key] = value
    return applied


def api_url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    return f"http://{host}:{port}/api"


def healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers at `url` (e.g. http://127.0.0.1:4200/api)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def use_running_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str | None:
    """The API URL to use: PREFECT_API_URL if set, else a healthy local server at host:port (then exported
    as PREFECT_API_URL), else None (Prefect starts a temporary server on the local history database)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    url = api_url(host, port)
    if healthy(url, timeout=1.0):
        os.environ["PREFECT_API_URL"] = url
        return url
    return None


@dataclass
class LocalServer:
    process: subprocess.Popen
    url: str
    log_path: Path
    seconds_to_healthy: float = 0.0

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate the server we started (its process group: the server and its own children)."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)


def start_server(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    log_path: str | Path | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> LocalServer:
    """`prefect server start --host HOST --port PORT` in its own process group; returns once /api/health
    answers. Raises ServerError (with the log's tail) if it exits or stays unhealthy for `timeout` s."""
    url = api_url(host, port)
    if healthy(url, timeout=1.0):
        raise ServerError(f"a Prefect server already answers at {url}")
    home = Path((env or os.environ).get("PREFECT_HOME") or Path.home() / ".prefect")
    log_path = Path(log_path) if log_path else home / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, **(env or {})}
    child_env.pop("PREFECT_API_URL", None)  # the server itself needs none
    started = time.monotonic()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
        )
    server = LocalServer(process, url, log_path)
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise ServerError(f"the Prefect server exited with code {process.returncode}:\n{_tail(log_path)}")
        if healthy(url, timeout=2.0):
            server.seconds_to_healthy = time.monotonic() - started
            return server
        time.sleep(0.5)
    server.stop()
    raise ServerError(
        f"the Prefect server at {url} was not healthy after {timeout:.0f} s:\n{_tail(log_path)}"
    )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

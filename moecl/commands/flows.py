"""`moecl evolve | serve | deploy | history | hooks install | data publish`: the Prefect faces (flows/) as
commands.

Prefect reads its settings when first imported, so each handler settles the environment first
(flows.server.prefect_environment: PREFECT_HOME defaults to <project>/.prefect, telemetry off) and imports
prefect after. Nothing here imports prefect at module level: `moecl --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

HOOK_MARKER = "# installed by `moecl hooks install`"


def _params(args):
    from moecl.config import load_params

    return load_params(args.params, args.overrides)


def _project_root(args) -> Path:
    return Path(args.params).resolve().parent


def _environment(args, use_server: bool = True) -> str | None:
    """Settle Prefect's environment; use a local server already running on the default port, if any."""
    from flows.server import prefect_environment, use_running_server

    prefect_environment(_project_root(args))
    return use_running_server() if use_server else os.environ.get("PREFECT_API_URL")


# --- moecl evolve -----------------------------------------------------------------------------------------------
def cmd_evolve(args) -> int:
    _params(args)  # a params problem is reported before Prefect starts
    url = _environment(args)
    print(
        f"prefect: {url or 'temporary local server'} (history in {os.environ['PREFECT_HOME']})",
        file=sys.stderr,
    )
    from flows.self_evolve import VersionsFailed, self_evolve

    state = self_evolve(
        params_path=args.params,
        task_id=args.task,
        data_version=args.data_version,
        overrides=args.overrides or None,
        return_state=True,
    )
    result = state.result(raise_on_failure=False)
    rows = (
        result.results if isinstance(result, VersionsFailed) else result if isinstance(result, list) else []
    )
    if args.json:
        print(
            json.dumps(
                {"state": state.name, "message": state.message, "versions": rows}, indent=2, default=str
            )
        )
    else:
        if not rows:
            print(state.message if state.is_failed() else "nothing to do: no pending dataset version")
        for r in rows:
            what = f"{r['state']}: {r.get('message') or ''}".strip().rstrip(":")  # e.g. Rejected: <reason>
            champion = (
                f"  champion {r.get('champion_before') or 'none'} -> {r.get('champion_after') or 'none'}"
            )
            print(
                f"{r['task_id']}@{(r['data_version'] or '?')[:10]}: {what}"
                + (champion if r.get("decision") else "")
            )
    return 0 if state.is_completed() else 1


# --- moecl serve ------------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    import signal

    params = _params(args)
    from flows.server import api_url, healthy, prefect_environment, start_server

    prefect_environment(_project_root(args))
    server = None
    if os.environ.get("PREFECT_API_URL"):
        print(f"prefect: using PREFECT_API_URL={os.environ['PREFECT_API_URL']}", file=sys.stderr)
    elif healthy(api_url(args.host, args.port), timeout=1.0):
        os.environ["PREFECT_API_URL"] = api_url(args.host, args.port)
        print(
            f"prefect: using the server already running at {os.environ['PREFECT_API_URL']}", file=sys.stderr
        )
    else:
        print(
            f"prefect: starting a local server on {args.host}:{args.port} "
            f"(log: {Path(os.environ['PREFECT_HOME']) / 'server.log'})",
            file=sys.stderr,
        )
        server = start_server(args.host, args.port)
        os.environ["PREFECT_API_URL"] = server.url
        print(
            f"prefect: server pid {server.process.pid} healthy after {server.seconds_to_healthy:.1f} s; "
            f"UI at {server.url[:-4]}",
            file=sys.stderr,
        )

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops like Ctrl-C: serving first, then the server
    try:
        from flows.deployments import serve_deployments

        serve_deployments(params, params_path=args.params, limit=args.limit)
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            print(f"prefect: stopping the local server (pid {server.process.pid})", file=sys.stderr)
            server.stop()
    return 0


# --- moecl deploy -----------------------------------------------------------------------------------------------
def _job_variable(text: str) -> tuple[str, object]:
    """KEY=VALUE, VALUE read as JSON where it parses (numbers, lists, objects), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def cmd_deploy(args) -> int:
    from moecl.errors import MoeclError

    params = _params(args)
    url = _environment(args)
    if not url:
        raise MoeclError(
            "no Prefect server to deploy to: set PREFECT_API_URL, or start one "
            "(`prefect server start --host 127.0.0.1 --port 4200`)"
        )
    from flows.deployments import deploy_to_work_pool, worker_command

    project = _project_root(args)
    with contextlib.redirect_stdout(sys.stderr):  # prefect.deploy prints its table: keep stdout ours
        result = deploy_to_work_pool(
            params,
            args.pool,
            params_path=os.path.relpath(Path(args.params).resolve(), project),
            project_dir=project,
            job_variables=dict(args.job_variables or []),
        )
    command = worker_command(args.pool)
    if args.json:
        print(json.dumps({**result, "api_url": url, "worker_command": command}, indent=2))
        return 0
    pool = f"{result['pool']} ({result['pool_type']}{', created' if result['created_pool'] else ''})"
    print(f"work pool {pool} on {url}:")
    for name, deployment_id in result["deployments"].items():
        print(f"  {name}  {deployment_id}")
    if result["job_variables"]:
        print(f"job variables: {json.dumps(result['job_variables'])}")
    if result["pool_type"] == "process":
        needs = f"moecl installed, this project at {result['job_variables'].get('working_dir') or project}"
    else:  # docker, kubernetes, ...: the image runs the code, the job template mounts the workspace
        needs = f"prefect-{result['pool_type']} installed; the image has moecl and mounts this project"
    print(
        f"\nOn each worker host ({needs}, on a shared filesystem; docs/scale-out.md), "
        f"with PREFECT_API_URL={url}, run:\n  {command}"
    )
    return 0


# --- moecl data publish -----------------------------------------------------------------------------------------
def cmd_publish(args) -> int:
    from moecl.errors import MoeclError

    params = _params(args)
    from flows.events import emit_all, landed_events

    events = landed_events(params, task_id=args.task, dvc_file=args.dvc_file)
    if args.dry_run:
        print(json.dumps(events, indent=2))
        return 0
    if not events:
        print("nothing to publish: no pending dataset version" + (f" of {args.task}" if args.task else ""))
        return 0
    url = _environment(args)
    if not url:
        raise MoeclError(
            "no Prefect server to publish to: set PREFECT_API_URL, or start one with `moecl serve`"
        )
    ids = emit_all(events)
    for event, event_id in zip(events, ids):
        p = event["payload"]
        print(f"{event['event']} {p['task_id']}@{p['data_version'][:10]} (event {event_id}) -> {url}")
    return 0


# --- moecl hooks install ----------------------------------------------------------------------------------------
def hook_script(python: str, project: Path, params: str, dvc_file: str = "data.dvc") -> str:
    """A post-commit hook: if the commit changed `dvc_file` (a path from the repository root), publish."""
    cmd = " ".join(
        shlex.quote(a)
        for a in [python, "-m", "moecl", "--params", params, "data", "publish", "--dvc-file", dvc_file]
    )
    return f"""#!/bin/sh
{HOOK_MARKER}: after a commit that changes {dvc_file},
# announce the new dataset versions to Prefect (moecl.dataset.landed); the served deployment processes them.
if git diff-tree --root --no-commit-id --name-only -r HEAD | grep -qx {shlex.quote(dvc_file)}; then
  (cd {shlex.quote(str(project))} && {cmd}) || echo "moecl: data publish failed (is a Prefect server running? see: moecl serve)" >&2
fi
exit 0
"""


def hooks_dir(project: Path) -> Path:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--git-path", "hooks"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return (project / out).resolve()
    except (OSError, subprocess.SubprocessError):
        if (project / ".git").is_dir():
            return project / ".git" / "hooks"
    from moecl.errors import MoeclError

    raise MoeclError(f"{project} is not a git repository: no hooks to install")


def cmd_hooks_install(args) -> int:
    from moecl.errors import MoeclError

    project = _project_root(args)
    hook = hooks_dir(project) / "post-commit"
    if hook.exists() and not args.force:
        raise MoeclError(f"{hook} exists: not overwriting it (pass --force to replace it)")
    params = os.path.relpath(Path(args.params).resolve(), project)
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(hook_script(sys.executable, project, params, args.dvc_file), encoding="utf-8")
    hook.chmod(0o755)
    print(f"installed {hook}: commits that change {args.dvc_file} run `moecl data publish`")
    return 0


# --- moecl history ----------------------------------------------------------------------------------------------
def cmd_history(args) -> int:
    _environment(args)
    from flows.artifacts import format_history
    from flows.history import read_history

    rows = read_history(limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    elif not rows:
        print("no self-evolution runs yet")
    else:
        print(format_history(rows))
    return 0


# --- registration -----------------------------------------------------------------------------------------------
def _data_actions(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The ACTION subparsers of `moecl data` (registered by moecl/commands/data.py, which sorts first)."""
    data = sub.choices.get("data")
    if data is None:
        data = sub.add_parser("data", help="task data")
        actions = data.add_subparsers(dest="data_command", metavar="ACTION")
        data.set_defaults(handler=lambda args: data.print_help() or 2)
        return actions
    for action in data._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return data.add_subparsers(dest="data_command", metavar="ACTION")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evolve", help="run the self-evolution flow once, here: every pending dataset version")
    p.add_argument("--task", help="only this task's current dataset version")
    p.add_argument("--data-version", help="only this dataset version (a task folder content hash)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(handler=cmd_evolve)

    p = sub.add_parser("serve", help="serve the poll and event-triggered deployments (starts a local server)")
    p.add_argument("--host", default="127.0.0.1", help="local server address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=4200, help="local server port (default: 4200)")
    p.add_argument(
        "--limit", type=int, default=None, help="runs this process executes at once (default: any)"
    )
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser(
        "deploy",
        help="register the poll and event-triggered deployments on a Prefect work pool (run by its workers)",
    )
    p.add_argument("--pool", required=True, help="work pool name (created as a `process` pool if missing)")
    p.add_argument(
        "--job-variable",
        dest="job_variables",
        action="append",
        type=_job_variable,
        metavar="KEY=VALUE",
        help="a job variable of the pool (repeatable; VALUE as JSON where it parses), e.g. image=NAME; "
        "a process pool's working_dir defaults to the project folder",
    )
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(handler=cmd_deploy)

    p = sub.add_parser(
        "history", help="past self-evolution runs from Prefect: task, version, decision, metrics"
    )
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.add_argument("--limit", type=int, default=20, help="newest N runs (default: 20)")
    p.set_defaults(handler=cmd_history)

    hooks = sub.add_parser("hooks", help="git hooks")
    hooks_sub = hooks.add_subparsers(dest="hooks_command", metavar="ACTION")
    hooks.set_defaults(handler=lambda args: hooks.print_help() or 2)
    p = hooks_sub.add_parser("install", help="a post-commit hook: `moecl data publish` when data.dvc changes")
    p.add_argument("--force", action="store_true", help="replace an existing post-commit hook")
    p.add_argument(
        "--dvc-file", default="data.dvc", help="the DVC file that tracks the data (default: data.dvc)"
    )
    p.set_defaults(handler=cmd_hooks_install)

    p = _data_actions(sub).add_parser(
        "publish", help="emit moecl.dataset.landed for each pending dataset version"
    )
    p.add_argument("--task", help="only this task")
    p.add_argument("--dvc-file", default="data.dvc", help="DVC file whose outs[0].md5 goes in the payload")
    p.add_argument("--dry-run", action="store_true", help="print the events instead of sending them")
    p.set_defaults(handler=cmd_publish)

"""Two deployments of `self_evolve`, served from this process: a scheduled poll and an event trigger.

- `poll`: cron params `flow.poll_cron`; processes every pending dataset version.
- `on-dataset-landed`: runs on each `moecl.dataset.landed` event (resource `moecl.dataset.<task_id>`, emitted by
  `moecl data publish`), with `task_id` and `data_version` taken from the event's payload.

Both carry params `flow.concurrency_limit` (runs beyond it queue); the workspace slot inside the flow keeps a
poll and a triggered run from working at the same time. Needs a Prefect server (PREFECT_API_URL): the
temporary server of a plain process never fires schedules or triggers.

Either `serve_deployments` (this process runs them) or `deploy_to_work_pool` (Prefect workers of a work pool
run them, `prefect worker start --pool NAME`, on this host or others: docs/scale-out.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moecl.config import Params
from moecl.errors import MoeclError

LANDED_EVENT = "moecl.dataset.landed"
RESOURCE_PREFIX = "moecl.dataset."
POLL_DEPLOYMENT = "poll"
TRIGGER_DEPLOYMENT = "on-dataset-landed"


def landed_trigger(params_path: str = "params.yaml"):
    from prefect.events import DeploymentEventTrigger

    # Plain strings with {{ }} are Jinja templates rendered against the triggering event (prefect 3.9:
    # RunDeployment.render_parameters upgrades them to {"__prefect_kind": "jinja"}). An event whose payload
    # lacks a field fails to render: the automation's action fails and no run is created.
    return DeploymentEventTrigger(
        name="moecl dataset landed",
        expect={LANDED_EVENT},
        match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
        parameters={
            "params_path": params_path,
            "task_id": "{{ event.payload.task_id }}",
            "data_version": "{{ event.payload.data_version }}",
        },
    )


def build_deployments(
    params: Params, params_path: str = "params.yaml", **deployment_kwargs: Any
) -> list[Any]:
    """The two deployments; `deployment_kwargs` go to every `to_deployment` (e.g. `job_variables`)."""
    from prefect.types.entrypoint import EntrypointType

    from flows.self_evolve import self_evolve

    common = {
        "concurrency_limit": params.flow.concurrency_limit,
        "parameters": {"params_path": params_path},
        "tags": ["moecl"],
        "entrypoint_type": EntrypointType.MODULE_PATH,  # flows.self_evolve.self_evolve: any working directory
        **deployment_kwargs,
    }
    poll = self_evolve.to_deployment(
        name=POLL_DEPLOYMENT,
        cron=params.flow.poll_cron,
        description="Process every pending dataset version (task folders whose content was never processed).",
        **common,
    )
    trigger = self_evolve.to_deployment(
        name=TRIGGER_DEPLOYMENT,
        triggers=[landed_trigger(params_path)],
        description=f"Process the dataset version named by a `{LANDED_EVENT}` event.",
        **common,
    )
    return [poll, trigger]


def serve_deployments(params: Params, params_path: str = "params.yaml", **serve_kwargs: Any) -> None:
    """Serve both deployments until interrupted (Ctrl-C); the poll's schedule is paused on shutdown and
    resumed by the next serve. Runs execute in subprocesses in the current working directory."""
    from prefect import serve

    from flows.self_evolve import ensure_workspace_limit

    ensure_workspace_limit()
    serve(*build_deployments(params, params_path), **serve_kwargs)


# --- a work pool instead of serve ---------------------------------------------------------------------------------
class WorkPoolError(MoeclError):
    """The work pool cannot take the deployments."""


def ensure_process_pool(pool_name: str) -> bool:
    """Create `pool_name` as a `process` work pool with Prefect's default process job template, if it does not
    exist (True if created). A pool of another type (docker, kubernetes, ...) is left as it is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool_name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=pool_name,
                    type=ProcessWorker.type,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
        except ObjectAlreadyExists:  # another process created it meanwhile
            return False
        return True


def deploy_to_work_pool(
    params: Params,
    pool_name: str,
    params_path: str = "params.yaml",
    project_dir: str | Path | None = None,
    job_variables: dict[str, Any] | None = None,
    work_queue_name: str | None = None,
) -> dict[str, Any]:
    """Register the poll and the `moecl.dataset.landed` deployments on work pool `pool_name` (created as a
    `process` pool if missing): the same parameters, schedule, trigger and concurrency as `serve_deployments`,
    run by the pool's workers instead of this process. Returns {"pool", "pool_type", "created_pool",
    "deployments": {name: id}, "job_variables"}.

    The code is the installed `flows` package (module-path entrypoint `flows.self_evolve.self_evolve`, no
    pull step, no image): each worker host needs moecl installed. The runs work in `project_dir` (default: the
    folder of `params_path`), which a process pool gets as job variable `working_dir`: relative paths in
    params (data/, registry/, banks/, reports/) resolve there, so every worker host needs that project at
    the same path, on a shared filesystem. Other pool types take what `job_variables` says (image, volumes).
    """
    from prefect import deploy
    from prefect.client.orchestration import get_client

    from flows.self_evolve import ensure_workspace_limit

    project = Path(project_dir) if project_dir else Path(params_path).resolve().parent
    project = project.resolve()
    created = ensure_process_pool(pool_name)
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(pool_name)
    variables = dict(job_variables or {})
    if pool.type == "process":
        variables.setdefault("working_dir", str(project))
    known = set(((pool.base_job_template or {}).get("variables") or {}).get("properties") or {})
    unknown = sorted(set(variables) - known) if known else []
    if unknown:
        raise WorkPoolError(
            f"work pool {pool_name!r} ({pool.type}) has no job variable(s) {', '.join(unknown)}; "
            f"it has: {', '.join(sorted(known))}"
        )
    ensure_workspace_limit()
    extra: dict[str, Any] = {"job_variables": variables}
    if work_queue_name:
        extra["work_queue_name"] = work_queue_name
    deployments = build_deployments(params, params_path, **extra)
    ids = deploy(
        *deployments,
        work_pool_name=pool_name,
        build=False,  # no image: a process pool runs the installed code; other pools name theirs
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,
    )
    if len(ids) != len(deployments):  # prefect.deploy reports a partial failure in its table, not by raising
        raise WorkPoolError(
            f"only {len(ids)} of {len(deployments)} deployments were registered on {pool_name!r}"
        )
    return {
        "pool": pool_name,
        "pool_type": pool.type,
        "created_pool": created,
        "deployments": {f"{d.flow_name}/{d.name}": str(i) for d, i in zip(deployments, ids)},
        "job_variables": variables,
    }


def worker_command(pool_name: str, limit: int | None = None) -> str:
    """What to run on each worker host, with PREFECT_API_URL set (from any folder: a process pool's runs
    start in its `working_dir` job variable)."""
    import shlex

    return f"prefect worker start --pool {shlex.quote(pool_name)}" + (f" --limit {limit}" if limit else "")

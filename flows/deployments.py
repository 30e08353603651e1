"""Two deployments of `self_evolve`, served from this process: a scheduled poll and an event trigger.

- `poll`: cron params `flow.poll_cron`; processes every pending dataset version.
- `on-dataset-landed`: runs on each `moecl.dataset.landed` event (resource `moecl.dataset.<task_id>`, emitted by
  `moecl data publish`), with `task_id` and `data_version` taken from the event's payload.

Both carry params `flow.concurrency_limit` (runs beyond it queue); the workspace slot inside the flow keeps a
poll and a triggered run from working at the same time. Needs a Prefect server (PREFECT_API_URL): the
temporary server of a plain process never fires schedules or triggers.
"""

from __future__ import annotations

from typing import Any

from moecl.config import Params

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


def build_deployments(params: Params, params_path: str = "params.yaml") -> list[Any]:
    from prefect.types.entrypoint import EntrypointType

    from flows.self_evolve import self_evolve

    common = {
        "concurrency_limit": params.flow.concurrency_limit,
        "parameters": {"params_path": params_path},
        "tags": ["moecl"],
        "entrypoint_type": EntrypointType.MODULE_PATH,  # flows.self_evolve.self_evolve: any working directory
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

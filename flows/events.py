"""`moecl.dataset.landed` events: one per pending dataset version, for the `on-dataset-landed` deployment."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from flows.deployments import LANDED_EVENT, RESOURCE_PREFIX
from moecl.config import Params


def data_dvc_md5(dvc_file: str | Path = "data.dvc") -> str | None:
    """outs[0].md5 of the DVC file that tracks the data folder (None without one)."""
    import yaml

    path = Path(dvc_file)
    if not path.is_file():
        return None
    try:
        outs = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("outs") or []
    except (yaml.YAMLError, OSError, AttributeError):
        return None
    first = outs[0] if outs and isinstance(outs[0], dict) else {}
    return first.get("md5")


def landed_events(
    params: Params, task_id: str | None = None, dvc_file: str | Path = "data.dvc"
) -> list[dict]:
    """The events to emit, in landing order: name, resource and payload of each pending version."""
    from moecl.evolve import pending_versions
    from moecl.registry import Registry

    md5 = data_dvc_md5(dvc_file)
    events = []
    for p in pending_versions(params, Registry.from_params(params)):
        if task_id and p.task_id != task_id:
            continue
        events.append(
            {
                "event": LANDED_EVENT,
                "resource": {
                    "prefect.resource.id": f"{RESOURCE_PREFIX}{p.task_id}",
                    "prefect.resource.name": p.task_id,
                },
                "payload": {"task_id": p.task_id, "data_version": p.data_version, "data_dvc_md5": md5},
            }
        )
    return events


def emit_all(events: list[dict[str, Any]]) -> list[str]:
    """Send the events now (not through the background worker: a CLI process exits right after); their ids."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    objs = [Event(**e) for e in events]

    async def _send() -> None:
        async with get_events_client() as client:
            for obj in objs:
                await client.emit(obj)

    asyncio.run(_send())
    return [str(o.id) for o in objs]

"""Past self-evolution runs, read back from the Prefect API: one row per `process-dataset-version` run."""

from __future__ import annotations

import json
from typing import Any

from flows import artifacts as art
from flows.self_evolve import VERSION_FLOW


def read_history(limit: int = 20) -> list[dict[str, Any]]:
    """The newest `limit` dataset-version runs, newest first, joined with their run-record artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowFilter,
        FlowFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[VERSION_FLOW])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=limit,
        )
        records: dict[str, dict] = {}
        if runs:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[art.KEY_RECORD]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in runs]),
                )
            )
            for a in artifacts:
                rows = json.loads(a.data) if isinstance(a.data, str) else a.data
                if rows and a.flow_run_id:
                    records[str(a.flow_run_id)] = rows[0]
    out = []
    for r in runs:
        when = r.start_time or r.expected_start_time
        run = {
            "id": str(r.id),
            "name": r.name,
            "parameters": r.parameters,
            "state": r.state.name if r.state else None,
            "state_message": r.state.message if r.state else None,
            "start_time": when.isoformat() if when else None,
        }
        out.append(art.history_row(run, records.get(str(r.id))))
    return out

"""The self-evolution flow: for each new dataset version, validate -> drift -> CL step -> evaluate -> gate ->
promote or reject, as Prefect tasks over the moecl.evolve library functions (no logic of its own).

`self_evolve` finds the pending dataset versions (or takes the one it is given) and runs one sub-flow run,
`process_dataset_version`, per version in landing order, named `<task>@<data version>`. Each sub-run holds the
Prefect global concurrency slot `moecl-workspace` and the workspace's file lock while it works, so nothing else
touches the registry, banks and metrics meanwhile, and publishes its artifacts (see flows/artifacts.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.context import TagsContext
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from flows import artifacts as art
from moecl import evolve
from moecl.config import Params, load_params
from moecl.data.validate import DataValidationError
from moecl.registry import Registry

WORKSPACE_LIMIT = "moecl-workspace"
VERSION_FLOW = "process-dataset-version"
EVOLVE_FLOW = "self-evolve"

# A BaseSpec to use instead of resolving params `model:` (tests inject a tiny in-memory model; it is not a flow
# parameter because a loader function cannot be serialised into a flow run's parameters).
_base_override = None


class VersionsFailed(Exception):
    """Some dataset versions of a self_evolve run failed; `.results` has every version's row."""

    def __init__(self, message: str, results: list[dict]):
        super().__init__(message)
        self.results = results


@contextmanager
def injected_base(base) -> Iterator[None]:
    """Run flows in this process on `base` (a moecl.model.base.BaseSpec) instead of params `model:`."""
    global _base_override
    previous, _base_override = _base_override, base
    try:
        yield
    finally:
        _base_override = previous


def _io_error(task, task_run, state) -> bool:
    """Retry only what a second try may fix: an I/O error. Invalid data or a code error fails at once."""
    try:
        state.result()
    except OSError:
        return True
    except BaseException:
        return False
    return False


IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 3, "retry_condition_fn": _io_error}
# Stage results (models, datasets, metrics) stay in memory: never hashed for a cache key, never persisted.
STAGE: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


def ensure_workspace_limit(name: str = WORKSPACE_LIMIT, limit: int = 1) -> bool:
    """Create the global concurrency limit if it does not exist (True if created). Without it,
    `concurrency(name)` would silently not limit anything: Prefect 3.9 treats a missing limit as no limit."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        except ObjectAlreadyExists:  # another process created it meanwhile
            return False
        return True


@contextmanager
def workspace(params: Params) -> Iterator[None]:
    """Exclusive use of the workspace: the Prefect slot first (visible in the UI), then the file lock (which
    also excludes non-Prefect writers such as `dvc repro`)."""
    ensure_workspace_limit()
    with (
        concurrency(WORKSPACE_LIMIT, occupy=1, strict=True, raise_on_lease_renewal_failure=False),
        evolve.evolution_lock(params),
    ):
        yield


# --- the stages as tasks (NO_CACHE: never hash models or datasets) ------------------------------------------------
# Retried where a second try can help (reading files); never training, evaluation or recording a decision.
STAGE_RETRIES: dict[str, dict[str, Any]] = {
    name: IO_RETRIES for name in ("validate", "load-base", "load-known-tasks", "drift", "load-replay")
}


def prefect_stage(name: str, fn, *args, **kwargs):
    """evolve.process_version's stage runner in a flow: each stage runs as a Prefect task named after it."""
    return task(fn, name=name, **STAGE, **STAGE_RETRIES.get(name, {}))(*args, **kwargs)


def resolve_base(params: Params):
    """The backbone of params `model:` (or the one a test injected)."""
    if _base_override is not None:
        return _base_override
    from moecl.model.base import base_from_params

    return base_from_params(params.model)


@task(name="publish-artifacts", **STAGE, retries=1, retry_delay_seconds=2)
def publish_artifacts(outcome: dict, champion_per_task: dict | None) -> None:
    create_markdown_artifact(
        art.summary_markdown(outcome),
        key=art.KEY_SUMMARY,
        description=f"{outcome['task_id']}@{art.short(outcome['data_version'])}",
    )
    create_table_artifact(
        [art.run_record(outcome)], key=art.KEY_RECORD, description="read by `moecl history`"
    )
    metrics = outcome.get("metrics")
    if metrics:
        create_table_artifact(
            art.matrix_rows(metrics),
            key=art.KEY_MATRIX,
            description="accuracy after each CL step (rows) on each task (columns)",
        )
        create_table_artifact(
            art.per_task_rows(metrics, champion_per_task),
            key=art.KEY_PER_TASK,
            description="final per-task accuracy: challenger vs champion",
        )
    if outcome.get("report_path"):
        create_link_artifact(
            art.file_uri(outcome["report_path"]),
            link_text="Evidently data drift report",
            key=art.KEY_DRIFT_REPORT,
        )
    if outcome.get("bank_dir"):
        create_link_artifact(
            art.file_uri(outcome["bank_dir"]), link_text=f"bank of {outcome.get('version')}", key=art.KEY_BANK
        )


@task(name="publish-note", **STAGE, retries=1, retry_delay_seconds=2)
def publish_note(task_id: str, data_version: str, decision: str, markdown: str, reason: str) -> None:
    """The artifacts of a version that was not processed (invalid data, superseded)."""
    create_markdown_artifact(
        markdown, key=art.KEY_SUMMARY, description=f"{task_id}@{art.short(data_version)}: {decision}"
    )
    row = art.run_record(
        {"task_id": task_id, "data_version": data_version, "decision": decision, "reasons": [reason]}
    )
    create_table_artifact([row], key=art.KEY_RECORD, description="read by `moecl history`")


@task(name="find-versions", **STAGE, **IO_RETRIES)
def find_versions(params: Params, task_id: str | None, data_version: str | None) -> list[tuple[str, str]]:
    """(task_id, data_version) pairs to process, in landing order."""
    if task_id:
        return [(task_id, data_version or evolve.version_for(params, task_id).data_version)]
    pending = evolve.pending_versions(params, Registry.from_params(params))
    return [(p.task_id, p.data_version) for p in pending if data_version in (None, p.data_version)]


# --- one dataset version ------------------------------------------------------------------------------------------
def _version_run_name() -> str:
    p = flow_run.parameters
    return f"{p.get('task_id')}@{art.short(p.get('data_version'))}"


@flow(name=VERSION_FLOW, flow_run_name=_version_run_name, log_prints=True)
def process_dataset_version(
    task_id: str,
    data_version: str | None = None,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
):
    """One dataset version of one task through the whole path; returns the outcome as a dict.

    The sub-run carries its caller's tags (`moecl`, `task:<id>`: for filtering the history); its task runs do
    not. A tagged task run asks the API for tag concurrency slots before it starts, so with the server gone
    every task after the outage would fail instead of the run going on to its decision."""
    with TagsContext(current_tags=set()):
        return _process_dataset_version(task_id, data_version, params_path, overrides)


def _process_dataset_version(
    task_id: str, data_version: str | None, params_path: str, overrides: list[str] | None
):
    logger = get_run_logger()
    params = load_params(params_path, overrides)
    registry = Registry.from_params(params)
    with workspace(params):
        # hashed under the lock: a run that waited for another one sees the folder as it is now
        pending = evolve.version_for(params, task_id)
        reason = evolve.superseded_by(pending, data_version)
        if reason:
            logger.warning("%s@%s: superseded: %s", task_id, art.short(data_version), reason)
            markdown = art.superseded_markdown(task_id, data_version, pending.data_version)
            publish_note(task_id, data_version, "superseded", markdown, reason)
            result = {
                "task_id": task_id,
                "data_version": data_version,
                "decision": "superseded",
                "reasons": [reason],
            }
            return Completed(
                name=art.decision_state_name("superseded"),
                message=art.decision_message([reason]),
                data=result,
            )
        champion = registry.champion()
        champion_per_task = (champion.metrics or {}).get("per_task") if champion else None
        try:  # the library's sequence, one Prefect task per stage; a corrupted champion is recorded "integrity"
            outcome = evolve.process_version(
                params,
                pending,
                base=lambda: resolve_base(params),
                registry=registry,
                outputs=evolve.Outputs(),
                flow_run_id=flow_run.id,
                run_stage=prefect_stage,
            )
        except DataValidationError as exc:
            logger.error("%s", exc)
            markdown = art.invalid_markdown(task_id, pending.data_version, str(exc))
            publish_note(task_id, pending.data_version, "invalid", markdown, str(exc))
            # still a failure (the version goes nowhere), named for what it is
            return Failed(name=art.decision_state_name("invalid"), message=f"invalid data: {exc}")
    result = outcome.to_dict()
    logger.info(
        "%s@%s: %s (%s); champion %s -> %s",
        task_id,
        art.short(pending.data_version),
        outcome.decision,
        "; ".join(outcome.reasons),
        outcome.champion_before,
        outcome.champion_after,
    )
    state = publish_artifacts(result, champion_per_task, return_state=True)
    if state.is_failed():  # the decision is recorded: reporting trouble must not turn it into a failure
        logger.warning("could not publish the artifacts: %s", state.message)
    # named after the decision (Promoted, Rejected, Skipped), still of the Completed type; the reason is the message
    return Completed(
        name=art.decision_state_name(outcome.decision),
        message=art.decision_message(outcome.reasons),
        data=result,
    )


# --- every pending version ----------------------------------------------------------------------------------------
def _evolve_run_name() -> str:
    p = flow_run.parameters
    if p.get("task_id"):
        return f"evolve-{p['task_id']}" + (
            f"@{art.short(p['data_version'])}" if p.get("data_version") else ""
        )
    return "evolve-pending" if not p.get("data_version") else f"evolve-@{art.short(p['data_version'])}"


@flow(name=EVOLVE_FLOW, flow_run_name=_evolve_run_name, log_prints=True)
def self_evolve(
    params_path: str = "params.yaml",
    task_id: str | None = None,
    data_version: str | None = None,
    overrides: list[str] | None = None,
):
    """Process the pending dataset versions (or the one named), in landing order, one sub-run each."""
    logger = get_run_logger()
    task_id, data_version = task_id or None, data_version or None  # a trigger renders a missing field as ""
    params = load_params(params_path, overrides)
    versions = find_versions(params, task_id, data_version)
    if not versions:
        logger.info("nothing to do: no pending dataset version%s", f" of {task_id}" if task_id else "")
    results, failed = [], []
    for tid, version in versions:
        with tags("moecl", f"task:{tid}"):
            state = process_dataset_version(tid, version, params_path, overrides, return_state=True)
        outcome = state.result(raise_on_failure=False)
        row = {
            "task_id": tid,
            "data_version": version,
            "state": state.name,  # Promoted, Rejected, ...: the decision (flows/artifacts.py DECISION_STATES)
            "message": state.message,
        }
        if isinstance(outcome, dict):
            row.update(
                {k: outcome.get(k) for k in ("decision", "version", "champion_before", "champion_after")}
            )
        results.append(row)
        if not state.is_completed():
            failed.append(row)
    create_markdown_artifact(art.batch_markdown(results), key=art.KEY_BATCH)
    if failed:
        names = ", ".join(f"{r['task_id']}@{art.short(r['data_version'])}" for r in failed)
        message = f"{len(failed)} of {len(results)} dataset version(s) failed: {names}"
        return Failed(message=message, data=VersionsFailed(message, results))
    return results

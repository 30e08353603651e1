"""The path of one dataset version: validate -> drift -> CL step -> evaluate -> gate -> promote or reject.

Library code (no Prefect, no DVC): the flows, the DVC stages, the CLI and the tests call these functions.
A dataset version (`data_version`) is the hash of a task folder's files (task_folder_hash; not
TaskData.content_hash, the hash of the parsed data that a bank records per task); the registry remembers which
versions were processed, so processing is idempotent. `evolution_lock` serialises whole runs in one workspace
(a file lock: two steps writing the same registry, banks and metrics at once would race). A run killed
part-way leaves nothing half-written, and the next run finishes the version: a complete challenger bank is
reused, a challenger that was registered but never decided is decided (not registered twice), and the drift
reference of a version promoted just before the kill is installed from its staged copy (docs/operations.md).

The first check of every version's run is `preflight`: the registry verified (hashes only). A champion whose
bank is not whole is never trained from: the run records the version as failed for the reason "integrity"
(`integrity_failure_recorded`), leaves the champion as it is, and the version stays pending until someone
rolls back to a verified bank. A full disk (ENOSPC) at any write raises a WriteError naming the file; what
was being written is removed, and the next run picks up from there like after a kill.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moecl.config import Params
from moecl.data.task import TaskData
from moecl.data.validate import (
    DataValidationError,
    list_task_folders,
    load_task,
    task_folder_hash,
    task_id_issues,
)
from moecl.errors import IntegrityError, MoeclError
from moecl.io import copy_folder_atomic, file_lock, install_folder, write_json_atomic
from moecl.metrics import ContinualMetrics
from moecl.model.base import BaseSpec, preferred_device
from moecl.registry import Registry, VersionRecord

if TYPE_CHECKING:
    from moecl.drift import DataDriftResult
    from moecl.gates import GateDecision

log = logging.getLogger(__name__)


@dataclass
class PendingVersion:
    task_id: str
    data_version: str  # task_folder_hash of the folder: the dataset version's identity
    folder: Path
    landed_at: float  # newest modification time in the folder: the landing order


@dataclass
class EvolveOutcome:
    task_id: str
    data_version: str  # task_folder_hash, as PendingVersion
    decision: str  # promote | reject | skipped
    reasons: list[str] = field(default_factory=list)
    version: str | None = None
    bank_dir: str | None = None
    champion_before: str | None = None
    champion_after: str | None = None
    metrics: dict | None = None
    gate: dict | None = None
    drift: dict | None = None
    report_path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Outputs:
    """Where a run writes what people read: metrics JSON, DVC plot data and PNGs, Evidently reports."""

    root: Path = Path(".")
    report_name: str | None = None  # a fixed report file name (the DVC stage's declared output)

    @property
    def cl_json(self) -> Path:
        return self.root / "metrics" / "cl.json"

    @property
    def gate_json(self) -> Path:
        return self.root / "metrics" / "gate.json"

    @property
    def drift_json(self) -> Path:
        return self.root / "metrics" / "drift.json"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def report(self, params: Params, task_id: str) -> Path:
        return self.root / params.drift.report_dir / (self.report_name or f"drift-{task_id}.html")


# --- discovery ------------------------------------------------------------------------------------------------
def _landed_at(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=folder.stat().st_mtime)


def pending_versions(params: Params, registry: Registry) -> list[PendingVersion]:
    """Task folders whose current content was never processed, in landing order (oldest first)."""
    pending = []
    for folder in list_task_folders(params.data.root):
        data_version = task_folder_hash(folder)
        if registry.processed(folder.name, data_version) is None:
            pending.append(PendingVersion(folder.name, data_version, folder, _landed_at(folder)))
    return sorted(pending, key=lambda p: (p.landed_at, p.task_id))


def version_for(params: Params, task_id: str) -> PendingVersion:
    """The current dataset version of one task. The id comes from outside (an event payload, `--task`): one that
    is not a plain folder name (`../x`, `a/b`, `/abs`) would reach a folder outside data.root, so it is refused."""
    folder = Path(params.data.root) / task_id
    issues = task_id_issues(task_id, str(folder))
    if issues:
        raise DataValidationError(issues, what=f"task {task_id!r}")
    if not folder.is_dir():
        raise MoeclError(f"no task folder {folder}")
    return PendingVersion(task_id, task_folder_hash(folder), folder, _landed_at(folder))


@contextmanager
def evolution_lock(params: Params) -> Iterator[None]:
    """One self-evolution step at a time per workspace (blocks until the previous one ends)."""
    with file_lock(Path(params.registry.root) / ".evolve.lock"):
        yield


# --- the stages -----------------------------------------------------------------------------------------------
def preflight(registry: Registry) -> list:
    """The first check of a run (cheap: hashes only): `moecl registry verify` without --all. Raises
    IntegrityError when the champion cannot be trained from (its pointer, record or bank); returns the other
    problems, each logged as a warning (a torn event line, an old bank's damage: they do not stop a run)."""
    from moecl.registry_verify import champion_problems, verify_registry

    problems = verify_registry(registry)
    blocking = champion_problems(problems)
    if blocking:
        lines = "\n  ".join(str(p) for p in blocking)
        raise IntegrityError(
            f"the champion is not whole; nothing is trained from it:\n  {lines}\n"
            "Roll back to the last verified bank (docs/operations.md, 'The champion is corrupted')."
        )
    for problem in problems:
        log.warning("registry verify: %s", problem)
    return problems


@contextmanager
def integrity_failure_recorded(registry: Registry, pending: PendingVersion) -> Iterator[None]:
    """Record the dataset version as failed, for the reason "integrity", if the block raises IntegrityError
    (then re-raised). The version stays pending: a failure is not a decision."""
    try:
        yield
    except IntegrityError as exc:
        registry.record_failure(pending.task_id, pending.data_version, "integrity", str(exc))
        raise


def validate_version(params: Params, pending: PendingVersion) -> TaskData:
    """Validate the new version (raises DataValidationError naming file:line:field; writes nothing)."""
    return load_task(pending.folder, params.data)


def load_other_tasks(params: Params, task_ids: list[str], exclude: str) -> dict[str, TaskData]:
    """Test data of the tasks the champion already knows (validated too). A task whose folder now holds an
    invalid version is evaluated on its last promoted version (its snapshot), so that one broken folder does
    not hold up every other task's versions; the broken version itself stays pending."""
    root = Path(params.data.root)
    tasks = {}
    for task_id in task_ids:
        if task_id == exclude:
            continue
        try:
            tasks[task_id] = load_task(root / task_id, params.data)
        except DataValidationError:
            reference = snapshot_dir(params, task_id)
            if not (reference / "task.yaml").is_file():
                raise
            log.warning("%s: the current folder is invalid; evaluating its last promoted version", task_id)
            tasks[task_id] = load_task(reference, params.data)
    return tasks


def replay_tasks(params: Params, task_ids: list[str], exclude: str) -> dict[str, TaskData] | None:
    """The earlier tasks' data a step replays (method.replay_per_task training records of each): each task's
    last promoted version, its snapshot; its current folder where it has none yet. None when replay is off."""
    if params.method.replay_per_task <= 0:
        return None
    tasks = {}
    for task_id in task_ids:
        if task_id == exclude:
            continue
        folder = snapshot_dir(params, task_id)
        if not (folder / "task.yaml").is_file():
            log.warning("%s: no promoted snapshot; replaying from its current folder", task_id)
            folder = Path(params.data.root) / task_id
        tasks[task_id] = load_task(folder, params.data)
    return tasks


def snapshot_dir(params: Params, task_id: str) -> Path:
    """The last PROMOTED version of each task's data: the reference for data drift of its next version."""
    return Path(params.registry.root) / "snapshots" / task_id


def drift_for_version(params: Params, task: TaskData, outputs: Outputs):
    """Evidently drift of a new version of a known task against its last promoted version; a new task gets a
    descriptive report and is never gated on drift (it is supposed to differ from other tasks)."""
    from moecl.drift import describe_new_task, detect_drift

    finish_snapshot(params)
    reference = snapshot_dir(params, task.task_id)
    report = outputs.report(params, task.task_id)
    if (reference / "task.yaml").is_file():
        previous = load_task(reference, params.data)
        result = detect_drift(previous, task, report, params.drift)
    else:
        result = describe_new_task(task, report, params.drift)
    write_json_atomic(outputs.drift_json, result.to_dict(), what="the drift metrics")
    return result


def challenger_dir(params: Params, pending: PendingVersion, champion: VersionRecord | None) -> Path:
    parent = champion.version if champion else "none"
    return Path(params.registry.banks_dir) / f"{pending.task_id}-{pending.data_version[:10]}-from-{parent}"


def train_challenger(
    params: Params,
    task: TaskData,
    pending: PendingVersion,
    *,
    base: BaseSpec,
    registry: Registry,
    eval_tasks: dict[str, TaskData],
    replay: dict[str, TaskData] | None = None,
    progress: bool = True,
) -> Path:
    """The CL step from the champion's bank. A bank left complete by an interrupted run is reused (banks
    appear atomically, so an existing one is whole; its files are verified all the same)."""
    from moecl.bank import verify_bank
    from moecl.train.launch import launch_step

    champion = registry.champion()
    out = challenger_dir(params, pending, champion)
    if out.is_dir():
        manifest = verify_bank(out)  # reused: whole, or refused
        if manifest.lineage.content_hash == task.content_hash():
            return out
        raise MoeclError(f"{out} exists but was trained on other data; move it away")
    parent = registry.bank_path(champion) if champion else None
    launch_step(
        params,
        task.task_id,
        parent,
        out,
        task=task,
        base=base,
        eval_tasks=eval_tasks,
        replay_tasks=replay,
        progress=progress,
        lineage={"data_version": pending.data_version},
    )
    return out


def evaluate_challenger(
    params: Params,
    bank: Path,
    base: BaseSpec,
    tasks: dict[str, TaskData],
    outputs: Outputs,
    progress: bool = True,
    write_to_bank: bool = True,
) -> ContinualMetrics:
    from moecl.evaluate import evaluate_bank
    from moecl.plots import write_plots

    evaluation = evaluate_bank(bank, base, tasks, params, progress=progress, write=write_to_bank)
    cl = {**evaluation.metrics.as_dict(), "stripping_rate": evaluation.stripping_rate}
    write_json_atomic(outputs.cl_json, cl, what="the metrics")
    write_plots(evaluation.metrics, outputs.plots_dir)
    return evaluation.metrics


def canary_predictions(params: Params, bank: Path, base: BaseSpec, tasks: dict[str, TaskData]):
    """(task, label, confidence) on fixed canary inputs: the first canary_per_task of each task's test split
    in a seeded stratified order, so champion and challenger see the same items."""
    from moecl.bank import load_bank
    from moecl.evaluate import task_predictions
    from moecl.sampling import stratified_sample

    loaded = load_bank(bank, base, device=preferred_device())
    out = []
    for task_id, task in sorted(tasks.items()):
        canaries = stratified_sample(task.test, params.gate.canary_per_task, params.train.seed)
        for p in task_predictions(
            loaded.model, loaded.tokenizer, task_id, canaries, params, with_scores=True
        ):
            out.append((task_id, p.label, float(p.confidence)))
    return out


def gate_challenger(
    params: Params,
    task: TaskData,
    metrics: ContinualMetrics,
    champion: VersionRecord | None,
    behaviour: tuple[list, list] | None,
    drift,
    outputs: Outputs,
):
    from moecl.gates import check_behaviour, check_data_drift, check_forgetting, decide

    champion_final = (champion.metrics or {}).get("per_task") if champion else None
    checks = check_forgetting(metrics, champion_final, task.task_id, params.gate)
    if behaviour is not None:
        checks += check_behaviour(behaviour[0], behaviour[1], params.gate)
    checks += check_data_drift(drift if getattr(drift, "has_reference", False) else None, params.gate)
    decision = decide(checks)
    write_json_atomic(outputs.gate_json, decision.to_dict(), what="the gate's decision")
    return decision


def _staged_snapshot(params: Params, task_id: str, data_version: str) -> Path:
    return snapshot_dir(params, task_id).parent / f".{task_id}.staged-{data_version[:16]}"


def stage_snapshot(params: Params, task: TaskData, data_version: str) -> Path:
    """Copy a version's folder beside the snapshots under a hidden name BEFORE it is promoted, so that a run
    killed between promoting and installing the drift reference leaves the copy for `finish_snapshot`."""
    staged = _staged_snapshot(params, task.task_id, data_version)
    # (a copy left by a run killed before it promoted is replaced)
    return copy_folder_atomic(
        task.path, staged, f"the drift reference of {task.task_id}", "Nothing was kept; nothing was promoted."
    )


def install_snapshot(params: Params, task_id: str, staged: Path) -> None:
    """Make a staged copy the task's drift reference (an atomic swap of the snapshot folder)."""
    install_folder(staged, snapshot_dir(params, task_id))


def finish_snapshot(params: Params) -> None:
    """Install the champion's drift reference if the run that promoted it was killed before installing it
    (its staged copy is still there). Called before a reference is read."""
    champion = Registry(params.registry.root).champion()
    if champion is None or not champion.task_id or not champion.data_version:
        return
    staged = _staged_snapshot(params, champion.task_id, champion.data_version)
    if staged.is_dir():
        install_snapshot(params, champion.task_id, staged)


def save_snapshot(params: Params, task: TaskData) -> None:
    """Copy the promoted version's folder as the drift reference (temp copy, then an atomic swap)."""
    install_snapshot(params, task.task_id, stage_snapshot(params, task, task_folder_hash(task.path)))


@dataclass(frozen=True)
class Challenger:
    """A dataset version's challenger once the gate has judged it: what `record_decision` registers and
    `decided_outcome` reports. `drift` is None where the caller has no drift result object (the DVC promote
    stage: its drift lives in metrics/drift.json)."""

    pending: PendingVersion
    task: TaskData  # the version's validated data
    bank: Path
    metrics: ContinualMetrics
    decision: GateDecision
    champion: VersionRecord | None  # the champion it was trained from and gated against
    drift: DataDriftResult | None = None


def record_decision(
    params: Params, registry: Registry, challenger: Challenger, flow_run_id: str | None = None
) -> VersionRecord:
    """Register the challenger with its lineage, then promote it or log the rejection."""
    from moecl.bank import read_manifest

    task, pending, bank, decision = challenger.task, challenger.pending, challenger.bank, challenger.decision
    manifest = read_manifest(bank)
    parent = challenger.champion.version if challenger.champion else None
    # a run killed between registering and deciding left this bank's record undecided: decide that one
    record = registry.undecided(task.task_id, pending.data_version, bank, parent) or registry.register(
        bank,
        parent_version=parent,
        task_id=task.task_id,
        data_version=pending.data_version,
        data_hashes={t.task_id: t.content_hash for t in manifest.tasks},  # content hashes, per task
        params=params,
        code_revision=manifest.lineage.code_revision,
        environment=manifest.lineage.environment,
        metrics=challenger.metrics.as_dict(),
        gate=decision.to_dict(),
        flow_run_id=flow_run_id,
    )
    if decision.promoted:
        staged = stage_snapshot(params, task, pending.data_version)
        try:
            registry.promote(record.version, reason="; ".join(decision.reasons))
        except BaseException:
            _settle_staged(params, registry, record, staged)
            raise
        install_snapshot(params, task.task_id, staged)
    else:
        registry.record_rejection(record.version, decision.reasons)
    return registry.get(record.version)


def _settle_staged(params: Params, registry: Registry, record: VersionRecord, staged: Path) -> None:
    """After a promotion that raised: if champion.json names the version anyway (only its event failed), its
    drift reference is installed (renames only); otherwise the staged copy goes, nothing was promoted."""
    try:
        champion = registry.champion()
    except MoeclError:
        return  # unknown: the copy stays for finish_snapshot or the next stage_snapshot
    if champion is not None and champion.version == record.version:
        install_snapshot(params, record.task_id, staged)
    else:
        shutil.rmtree(staged, ignore_errors=True)


# --- small pieces shared by process_version and the Prefect flow (flows/self_evolve.py) --------------------------
def known_task_ids(registry: Registry, champion: VersionRecord | None) -> list[str]:
    """The tasks the champion's bank knows, in learning order (none without a champion)."""
    if champion is None:
        return []
    from moecl.bank import read_manifest

    return read_manifest(registry.bank_path(champion)).task_ids


def skipped_outcome(
    pending: PendingVersion, done: VersionRecord, champion_before: str | None
) -> EvolveOutcome:
    """The outcome of a dataset version that was already decided (`Registry.processed` found `done`)."""
    return EvolveOutcome(
        pending.task_id,
        pending.data_version,
        "skipped",
        [f"already processed as {done.version}"],
        version=done.version,
        champion_before=champion_before,
        champion_after=champion_before,
    )


def decided_outcome(challenger: Challenger, record: VersionRecord, registry: Registry) -> EvolveOutcome:
    """The outcome of a dataset version once `record_decision` has promoted or rejected its challenger."""
    after, decision, drift = registry.champion(), challenger.decision, challenger.drift
    return EvolveOutcome(
        challenger.pending.task_id,
        challenger.pending.data_version,
        decision.decision,
        list(decision.reasons),
        version=record.version,
        bank_dir=str(challenger.bank),
        champion_before=challenger.champion.version if challenger.champion else None,
        champion_after=after.version if after else None,
        metrics=challenger.metrics.as_dict(),
        gate=decision.to_dict(),
        drift=drift.to_dict() if drift is not None else None,
        report_path=drift.report_path if drift is not None else None,
    )


# --- all of it --------------------------------------------------------------------------------------------------
def superseded_by(pending: PendingVersion, data_version: str | None) -> str | None:
    """Why a run asked to process `data_version` does not: the task's folder now holds another version (landed
    since; its own run processes it). None when the folder holds the version asked for, or none was named."""
    if data_version and pending.data_version != data_version:
        return f"the workspace holds {pending.data_version}, processed by its own run"
    return None


def call_stage(name: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """How `process_version` runs a stage by default: it calls it. The Prefect flow passes a runner that makes
    each stage a task of its own (with its retries), so the flow and the library run one sequence."""
    return fn(*args, **kwargs)


def process_version(
    params: Params,
    pending: PendingVersion,
    *,
    base: BaseSpec | Callable[[], BaseSpec],
    registry: Registry,
    outputs: Outputs | None = None,
    flow_run_id: str | None = None,
    progress: bool = True,
    run_stage: Callable[..., Any] = call_stage,
) -> EvolveOutcome:
    """Run the whole path for one dataset version, each stage through `run_stage(name, fn, *args)`.

    `base`: the backbone, or a function that resolves it (called, as the "load-base" stage, only once the
    version is valid). Invalid data raises before anything is written; a champion that fails its first check
    (`preflight`) raises IntegrityError, the version recorded as failed."""
    outputs = outputs or Outputs()
    with integrity_failure_recorded(registry, pending):
        run_stage("verify-registry", preflight, registry)
        done = registry.processed(pending.task_id, pending.data_version)
        champion = registry.champion()
        before = champion.version if champion else None
        if done is not None:
            return skipped_outcome(pending, done, before)
        task = run_stage("validate", validate_version, params, pending)
        if not isinstance(base, BaseSpec):
            base = run_stage("load-base", base)
        known = known_task_ids(registry, champion)
        others = run_stage("load-known-tasks", load_other_tasks, params, known, task.task_id)
        drift = run_stage("drift", drift_for_version, params, task, outputs)
        replay = run_stage("load-replay", replay_tasks, params, known, task.task_id)
        bank = run_stage(
            "train",
            train_challenger,
            params,
            task,
            pending,
            base=base,
            registry=registry,
            eval_tasks=others,
            replay=replay,
            progress=progress,
        )
        tasks = {**others, task.task_id: task}
        metrics = run_stage("evaluate", evaluate_challenger, params, bank, base, tasks, outputs, progress)
        behaviour = None
        if champion is not None and others:
            behaviour = (
                run_stage("canaries", canary_predictions, params, registry.bank_path(champion), base, others),
                run_stage("canaries", canary_predictions, params, bank, base, others),
            )
        decision = run_stage(
            "gate", gate_challenger, params, task, metrics, champion, behaviour, drift, outputs
        )
        challenger = Challenger(pending, task, bank, metrics, decision, champion, drift)
        record = run_stage("record-decision", record_decision, params, registry, challenger, flow_run_id)
        return decided_outcome(challenger, record, registry)


class InvalidVersions(DataValidationError):
    """Some pending versions failed validation; the valid ones were processed (`.outcomes`), the invalid ones
    stay pending (nothing was written for them) until their folder is fixed. `.issues` lists every issue."""

    def __init__(self, errors: list[tuple[PendingVersion, DataValidationError]], outcomes: list):
        self.errors = errors
        self.outcomes = outcomes
        names = ", ".join(f"{p.task_id}@{p.data_version[:12]}" for p, _ in errors)
        done = f"; the other {len(outcomes)} version(s) were processed" if outcomes else ""
        super().__init__(
            [issue for _, exc in errors for issue in exc.issues],
            what=f"{len(errors)} dataset version(s) ({names}{done})",
        )


def evolve_pending(
    params: Params,
    *,
    base: BaseSpec,
    registry: Registry,
    outputs: Outputs | None = None,
    flow_run_id: str | None = None,
    progress: bool = True,
) -> list[EvolveOutcome]:
    """Process every pending dataset version, in landing order, one at a time. An invalid version does not
    hold up the ones behind it: they are processed, then InvalidVersions names what failed and where."""
    outcomes, invalid = [], []
    with evolution_lock(params):
        for pending in pending_versions(params, registry):
            try:
                outcomes.append(
                    process_version(
                        params,
                        pending,
                        base=base,
                        registry=registry,
                        outputs=outputs,
                        flow_run_id=flow_run_id,
                        progress=progress,
                    )
                )
            except DataValidationError as exc:
                invalid.append((pending, exc))
    if invalid:
        raise InvalidVersions(invalid, outcomes)
    return outcomes

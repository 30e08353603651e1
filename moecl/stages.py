"""DVC stages: `python -m moecl.stages <stage>`, one function each, over the same library path as the flows.

    champion  -> pipeline/champion.json     the registry's champion (always re-read: it lives outside DVC),
                                            verified first (`moecl registry verify`: a corrupted one stops here)
    validate  -> metrics/validation.json    every task folder under data.root
    drift     -> reports/drift.html, metrics/drift.json
    train     -> pipeline/challenger/       one CL step from the champion's bank
    evaluate  -> metrics/cl.json, plots/
    gate      -> metrics/gate.json          from metrics/cl.json (the bank is evaluated once, by `evaluate`)
    promote   (outside `dvc repro`): register the challenger with metrics/cl.json; promote it if the gate passed

The champion the step starts from is an input read from the registry, never an output of the same run, so the
graph stays acyclic; promotion changes the registry afterwards, and the next `dvc repro` sees a new champion.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from moecl.config import Params, load_params
from moecl.errors import MoeclError
from moecl.io import copy_folder_atomic, write_json_atomic

CHAMPION_JSON = Path("pipeline/champion.json")
CHALLENGER = Path("pipeline/challenger")
REPORT_NAME = "drift.html"


def _registry(params: Params):
    from moecl.registry import Registry

    return Registry.from_params(params)


def _outputs():
    from moecl.evolve import Outputs

    return Outputs(Path("."), report_name=REPORT_NAME)


def selected_version(params: Params):
    """The dataset version this run processes: train.task if set, else the oldest unprocessed version."""
    from moecl.evolve import pending_versions, version_for

    if params.train.task:
        return version_for(params, params.train.task)
    pending = pending_versions(params, _registry(params))
    if not pending:
        raise MoeclError(
            f"no unprocessed dataset version under {params.data.root}: nothing to train. Add or change a "
            "task folder and `dvc add data` (README: your own task, by hand), or retrain a task's current "
            "version with `dvc exp run -S train.task=ID`"
        )
    return pending[0]


def champion(params: Params) -> None:
    from moecl.evolve import preflight

    registry = _registry(params)
    preflight(registry)  # a champion that is not whole (hashes) stops `dvc repro` here, before any stage
    record = registry.champion()
    state = (
        {"version": record.version, "bank_dir": str(registry.bank_path(record))}
        if record
        else {"version": None}
    )
    write_json_atomic(CHAMPION_JSON, state)


def validate(params: Params) -> None:
    from moecl.data.validate import list_task_folders, validate_task_folder

    folders = list_task_folders(params.data.root)
    if not folders:
        raise MoeclError(f"no task folders under {params.data.root} (run `dvc pull`, or `moecl data demo`)")
    report = {f.name: [i.to_dict() for i in validate_task_folder(f, params.data)] for f in folders}
    bad = {k: v for k, v in report.items() if v}
    if bad:
        for issues in bad.values():
            for issue in issues:
                print(
                    f"{issue['file']}:{issue['line']}: {issue['field']}: {issue['message']}", file=sys.stderr
                )
        raise MoeclError(
            f"{sum(len(v) for v in bad.values())} validation issue(s) in {', '.join(sorted(bad))}"
        )
    write_json_atomic("metrics/validation.json", {"valid": True, "tasks": sorted(report)})


def drift(params: Params) -> None:
    from moecl.evolve import drift_for_version, validate_version

    task = validate_version(params, selected_version(params))
    drift_for_version(params, task, _outputs())


def _champion_state() -> dict:
    return json.loads(CHAMPION_JSON.read_text()) if CHAMPION_JSON.is_file() else {"version": None}


def train(params: Params) -> None:
    from moecl.bank import read_manifest
    from moecl.evolve import finish_snapshot, load_other_tasks, replay_tasks, validate_version
    from moecl.model.base import base_from_params
    from moecl.train.launch import launch_step

    pending = selected_version(params)
    task = validate_version(params, pending)
    parent = _champion_state().get("bank_dir")
    known = read_manifest(parent).task_ids if parent else []
    others = load_other_tasks(params, known, exclude=task.task_id)
    finish_snapshot(params)
    replay = replay_tasks(params, known, exclude=task.task_id)
    if CHALLENGER.exists():
        shutil.rmtree(CHALLENGER)
    launch_step(
        params,
        task.task_id,
        parent,
        CHALLENGER,
        task=task,
        base=base_from_params(params.model),
        eval_tasks=others,
        replay_tasks=replay,
        lineage={"data_version": pending.data_version},
    )


def _challenger_tasks(params: Params):
    from moecl.bank import read_manifest
    from moecl.evolve import load_other_tasks

    manifest = read_manifest(CHALLENGER)
    return manifest, load_other_tasks(params, manifest.task_ids, exclude="")


def evaluate(params: Params) -> None:
    from moecl.evolve import evaluate_challenger
    from moecl.model.base import base_from_params

    _, tasks = _challenger_tasks(params)
    evaluate_challenger(
        params, CHALLENGER, base_from_params(params.model), tasks, _outputs(), write_to_bank=False
    )  # the bank is the train stage's output: never modify it


def _challenger_metrics(task_ids: list[str], trained: str | None):
    """The evaluate stage's metrics/cl.json (the gate and promote read it rather than evaluating the bank
    again), checked to be the challenger's (`task_ids`: its tasks; `trained`: its newest): same tasks, its
    newest task last."""
    from moecl.metrics import ContinualMetrics

    path = _outputs().cl_json
    if not path.is_file():
        raise MoeclError(f"{path} is missing: run the evaluate stage first (`dvc repro`)")
    metrics = ContinualMetrics.from_dict(json.loads(path.read_text()))
    tasks = sorted(task_ids)
    if sorted(metrics.order) != tasks or not metrics.steps or metrics.steps[-1] != trained:
        raise MoeclError(
            f"{path} does not belong to {CHALLENGER} (its tasks {sorted(metrics.order)}, last trained "
            f"{metrics.steps[-1] if metrics.steps else None}; the challenger's {tasks}, last trained {trained}): "
            "run `dvc repro` again"
        )
    return metrics


def _gate_inputs(params: Params):
    from moecl.model.base import base_from_params

    manifest, tasks = _challenger_tasks(params)
    metrics = _challenger_metrics(manifest.task_ids, manifest.lineage.trained_task)
    return manifest, tasks, base_from_params(params.model), metrics


def gate(params: Params) -> None:
    from moecl.drift import DataDriftResult
    from moecl.evolve import canary_predictions, gate_challenger

    manifest, tasks, base, metrics = _gate_inputs(params)
    new_task = manifest.lineage.trained_task
    registry = _registry(params)
    record = registry.champion()
    others = {t: d for t, d in tasks.items() if t != new_task}
    behaviour = None
    if record is not None and others:
        champion_bank = registry.bank_path(record)
        known = {t: d for t, d in others.items() if (champion_bank / f"expert-{t}.safetensors").exists()}
        behaviour = (
            canary_predictions(params, champion_bank, base, known),
            canary_predictions(params, CHALLENGER, base, known),
        )
    drift_result = DataDriftResult(**json.loads(Path("metrics/drift.json").read_text()))
    decision = gate_challenger(params, tasks[new_task], metrics, record, behaviour, drift_result, _outputs())
    print(f"gate: {decision.decision} - " + "; ".join(decision.reasons))


def promote(params: Params) -> None:
    """Register the pipeline's challenger (copied into banks/, since pipeline/ is rewritten by every repro)."""
    from moecl.bank import read_manifest
    from moecl.evolve import Challenger, record_decision, validate_version, version_for
    from moecl.gates import GateDecision

    manifest = read_manifest(CHALLENGER)
    task_id = manifest.lineage.trained_task
    metrics = _challenger_metrics(manifest.task_ids, task_id)
    decision = GateDecision.from_dict(json.loads(Path(_outputs().gate_json).read_text()))
    pending = version_for(params, task_id)
    registry = _registry(params)
    if registry.processed(task_id, pending.data_version):
        print(f"{task_id}@{pending.data_version[:10]} was already processed; nothing to do")
        return
    dest = Path(params.registry.banks_dir) / f"{task_id}-{pending.data_version[:10]}-pipeline"
    if not dest.exists():
        copy_folder_atomic(CHALLENGER, dest, "the challenger bank's registry copy")
    task = validate_version(params, pending)
    challenger = Challenger(pending, task, dest, metrics, decision, champion=registry.champion())
    record = record_decision(params, registry, challenger)
    print(f"{record.version}: {record.status} ({'; '.join(decision.reasons)})")


STAGES = {f.__name__: f for f in (champion, validate, drift, train, evaluate, gate, promote)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moecl.stages",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        STAGES[args.stage](load_params(args.params))
    except MoeclError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

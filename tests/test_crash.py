"""SIGKILL mid-training, mid-bank-write and at three points of a promotion leaves nothing half-written, and
the next run finishes the version exactly once (docs/operations.md says what happens on call).

Every workspace here uses relative paths (data/tasks, banks, registry, metrics, ...) and the test runs in it, so
"nothing else was written" is a comparison of the whole folder (moecl.testing.tree). Runs use one torch thread: on
two shared cores more threads only wait for each other. Kills are real SIGKILLs of separate processes (tests/faults.py).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from moecl.config import load_params
from moecl.data.validate import load_task, task_folder_hash
from moecl.evolve import Outputs
from moecl.registry import Registry
from moecl.testing import (
    TRAINING,
    assert_consistent,
    decisions,
    join_process,
    land,
    read_log,
    run_library,
    sentiment_task,
    tree,
    wait_for,
    write_params,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the fixtures champion_ws, ws: tests/conftest.py


def registry_state(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(root).items() if k.startswith("registry/")}


def _visible_banks(root: Path) -> set[str]:
    return {p.name for p in (root / "banks").iterdir() if not p.name.startswith(".")}


@pytest.mark.slow
def test_sigkill_mid_training_leaves_no_trace_and_the_next_run_redoes_the_step(ws, tiny_base):
    from tests import faults

    params = load_params("params.yaml")
    params.train.epochs = 8  # long enough to be caught mid-training
    write_params(ws, params)
    version = task_folder_hash(land(ws, sentiment_task()))
    banks, registry_before = _visible_banks(ws), registry_state(ws)
    t0 = time.monotonic()
    proc, log, _ = faults.start(ws, "none", "killed-mid-training")
    try:
        wait_for(lambda: TRAINING.search(read_log(log)), 120, "the first optimisation step", [log])
        at = time.monotonic() - t0
    finally:
        proc.kill()
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert_consistent(ws)
    assert _visible_banks(ws) == banks and registry_state(ws) == registry_before

    registry = Registry.from_params(params)
    t1 = time.monotonic()
    (outcome,) = run_library(params, tiny_base)
    assert (outcome.task_id, outcome.data_version, outcome.decision) == ("sentiment", version, "promote")
    assert decisions(registry, outcome.version) == ["registered", "promoted"]
    assert registry.processed("sentiment", version).version == outcome.version == registry.champion().version
    assert run_library(params, tiny_base) == []
    print(f"\n[timing] killed {at:.1f} s after start (mid-training); rerun {time.monotonic() - t1:.1f} s")


@pytest.mark.slow
def test_sigkill_while_the_bank_is_written_leaves_only_a_hidden_temp_folder(ws, tiny_base):
    from tests import faults

    params = load_params("params.yaml")
    version = task_folder_hash(land(ws, sentiment_task()))
    banks, registry_before = _visible_banks(ws), registry_state(ws)
    proc, log, _ = faults.start(ws, "kill-mid-bank-write", "killed-mid-bank-write")
    join_process(proc, log)
    assert proc.exitcode == -signal.SIGKILL, read_log(log)[-3000:]
    debris = [p for p in (ws / "banks").iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
    assert len(debris) == 1 and not (debris[0] / "bank.json").exists()  # the kill hit inside save_bank
    assert_consistent(ws)
    assert _visible_banks(ws) == banks and registry_state(ws) == registry_before

    (outcome,) = run_library(params, tiny_base)
    assert (outcome.data_version, outcome.decision) == (version, "promote")
    assert decisions(Registry.from_params(params), outcome.version) == ["registered", "promoted"]
    assert debris[0].exists()  # left for a person to delete; never read (docs/operations.md)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault", ["kill-before-promote", "kill-after-champion-write", "kill-before-snapshot-install"]
)
def test_sigkill_during_promotion_leaves_old_or_new_champion_and_the_next_run_finishes(fault, ws, tiny_base):
    from moecl import evolve
    from tests import faults

    params = load_params("params.yaml")
    folder = land(ws, sentiment_task())
    version = task_folder_hash(folder)
    champion_file = ws / "registry" / "champion.json"
    old_bytes, old = champion_file.read_bytes(), json.loads(champion_file.read_text())
    proc, log, _ = faults.start(ws, fault, f"{fault}")
    join_process(proc, log)
    assert proc.exitcode == -signal.SIGKILL, read_log(log)[-3000:]
    assert_consistent(ws)

    registry = Registry.from_params(params)
    (record,) = [r for r in registry.list_versions() if r.task_id == "sentiment"]
    snapshot = ws / "registry" / "snapshots" / "sentiment"
    assert not snapshot.exists()
    if (
        fault == "kill-before-promote"
    ):  # the old champion, byte for byte; the challenger registered, undecided
        assert champion_file.read_bytes() == old_bytes
        assert record.status == "candidate" and registry.processed("sentiment", version) is None
    else:  # the new champion, whole
        assert json.loads(champion_file.read_text()) == {
            "version": record.version,
            "previous": [old["version"], *old["previous"]],
        }
        assert (
            record.status == "promoted" and registry.processed("sentiment", version).version == record.version
        )

    outcomes = run_library(params, tiny_base)
    if fault == "kill-before-promote":  # the next run decides the SAME record: no second registration
        assert [(o.task_id, o.decision, o.version) for o in outcomes] == [
            ("sentiment", "promote", record.version)
        ]
        assert snapshot.is_dir()
    else:  # nothing left to process
        assert outcomes == []
        # the drift reference is installed from its staged copy before it is next read
        drift = evolve.drift_for_version(params, load_task(folder, params.data), Outputs(ws / "scratch"))
        assert drift.has_reference
    assert task_folder_hash(snapshot) == version
    assert not list(snapshot.parent.glob(".sentiment.staged-*"))
    assert [r.version for r in registry.list_versions() if r.task_id == "sentiment"] == [record.version]
    assert registry.champion().version == record.version
    # the event lost with the killed process stays lost: champion.json is the truth for the status
    lost = fault == "kill-after-champion-write"
    assert decisions(registry, record.version) == ["registered"] + ([] if lost else ["promoted"])
    assert run_library(params, tiny_base) == []


def test_an_undecided_candidate_is_decided_by_the_next_record_decision(tmp_path):
    """Registry.undecided matches task, dataset version, bank and parent, and only undecided records."""
    registry = Registry(tmp_path / "registry", tmp_path)
    bank, other = tmp_path / "banks" / "b", tmp_path / "banks" / "c"
    bank.mkdir(parents=True)
    other.mkdir()
    first = registry.register(bank, task_id="t", data_version="h1")
    assert registry.undecided("t", "h1", bank, None).version == first.version
    for args in (
        ("t", "h2", bank, None),
        ("u", "h1", bank, None),
        ("t", "h1", other, None),
        ("t", "h1", bank, "v9"),
    ):
        assert registry.undecided(*args) is None
    registry.record_rejection(first.version, "no")
    assert registry.undecided("t", "h1", bank, None) is None

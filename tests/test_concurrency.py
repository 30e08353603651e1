"""Concurrent triggers are processed one at a time, each version once; a burst of ten versions is processed in
landing order, none lost (docs/operations.md says what happens on call).

Every workspace here uses relative paths (data/tasks, banks, registry, metrics, ...) and the test runs in it, so
"nothing else was written" is a comparison of the whole folder (moecl.testing.tree). Runs use one torch thread: on
two shared cores more threads only wait for each other. Triggers are separate processes (tests/faults.py).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from moecl.config import load_params
from moecl.data.validate import task_folder_hash
from moecl.registry import Registry
from moecl.testing import (
    TRAINING,
    assert_consistent,
    decisions,
    join_process,
    land,
    make_task,
    read_log,
    run_library,
    sentiment_task,
    wait_for,
    write_params,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the fixtures champion_ws, ws: tests/conftest.py


@pytest.mark.slow
def test_concurrent_triggers_run_one_at_a_time_and_each_version_once(ws):
    """A is training `sentiment` when `spamtask` lands and two more triggers (B, C) fire at once: B and C are
    the same version, A and B/C different ones. The evolution lock serialises them; each version is decided
    once, in landing order."""
    from tests import faults

    params = load_params("params.yaml")
    params.train.epochs = 6  # A is still busy when B and C start
    write_params(ws, params)
    first = task_folder_hash(land(ws, sentiment_task()))
    a, a_log, a_out = faults.start(ws, "none", "trigger-a")
    wait_for(lambda: TRAINING.search(read_log(a_log)), 120, "A's first optimisation step", [a_log])
    second = task_folder_hash(land(ws, make_task("spamtask", ["spam", "ham"])))
    (b, b_log, b_out), (c, c_log, c_out) = (faults.start(ws, "none", n) for n in ("trigger-b", "trigger-c"))
    for proc, log in ((a, a_log), (b, b_log), (c, c_log)):
        join_process(proc, log)
        assert proc.exitcode == 0, read_log(log)[-3000:]
    results = {n: json.loads(p.read_text()) for n, p in (("a", a_out), ("b", b_out), ("c", c_out))}
    assert results["a"]["outcomes"] == [["sentiment", first, "promote", "v0002"]]
    assert sorted([results["b"]["outcomes"], results["c"]["outcomes"]]) == [
        [],
        [["spamtask", second, "promote", "v0003"]],
    ]
    held = sorted(span for r in results.values() for span in r["lock_held"])
    assert len(held) == 3 and all(nxt[0] >= prev[1] for prev, nxt in zip(held, held[1:])), held
    (a_span,) = results["a"]["lock_held"]
    assert results["b"]["started"] < a_span[1] and results["c"]["started"] < a_span[1]  # B and C had to wait

    registry = Registry.from_params(params)
    records = registry.list_versions()
    assert [(r.version, r.task_id, r.data_version) for r in records[1:]] == [
        ("v0002", "sentiment", first),
        ("v0003", "spamtask", second),
    ]
    assert all(decisions(registry, r.version) == ["registered", "promoted"] for r in records[1:])
    assert registry.champion().version == "v0003" and records[2].parent_version == "v0002"
    assert_consistent(ws)


@pytest.mark.slow
def test_a_burst_of_ten_versions_is_processed_in_landing_order_none_lost(ws, tiny_base):
    """Ten task versions land within a minute (here: 10 distinct tasks, their landing times 5 s apart, in an order
    unlike their names). One of them is replaced by a newer version before the run starts: only the version in
    the folder when the run looks exists for it (the replaced one is superseded, never trained)."""
    params = load_params("params.yaml")
    now = time.time()
    order = [f"burst-{i}" for i in (3, 7, 0, 9, 1, 5, 8, 2, 6, 4)]
    replaced = task_folder_hash(land(ws, make_task("burst-5", ["spam", "ham"], n_train=8, n_test=4, seed=1)))
    hashes = {}
    for rank, name in enumerate(order):
        folder = land(ws, make_task(name, ["spam", "ham"], n_train=8, n_test=4, seed=2), replace=True)
        for path in folder.iterdir():
            os.utime(path, (now - 60 + 5 * rank, now - 60 + 5 * rank))
        hashes[name] = task_folder_hash(folder)
    assert replaced != hashes["burst-5"]
    t0 = time.monotonic()
    outcomes = run_library(params, tiny_base)
    seconds = time.monotonic() - t0
    assert [(o.task_id, o.data_version, o.decision) for o in outcomes] == [
        (n, hashes[n], "promote") for n in order
    ]
    registry = Registry.from_params(params)
    records = registry.list_versions()[1:]
    assert [(r.task_id, r.data_version) for r in records] == [(n, hashes[n]) for n in order]
    assert all(decisions(registry, r.version) == ["registered", "promoted"] for r in records)
    assert not any(replaced in (r.data_version, *r.data_hashes.values()) for r in registry.list_versions())
    from moecl.bank import read_manifest

    assert read_manifest(registry.champion_bank()).task_ids == ["topics", *order]
    assert run_library(params, tiny_base) == []
    print(f"\n[timing] 10 versions processed in {seconds:.1f} s")

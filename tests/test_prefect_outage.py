"""The Prefect API goes away mid-run (slow: real servers, real flow runs in separate processes), and the flow's
refusal of a corrupted champion (in-process, under the test harness).

The outage: a local `prefect server` is stopped (SIGTERM to its process group, as when `moecl serve` or the
server's host goes down) from inside a run of `self_evolve`, at two points:
1. after the run found the pending version, before the version's sub-run starts: the sub-run cannot be
   created, the run fails, nothing in the workspace changes, and the next run (a server back) processes it;
2. while the step trains: Prefect 3.9 reports task states through its events client in the background, so the
   tasks go on without the server, the decision is recorded in the registry, and only the run's own final
   state cannot be reported: the process fails (after Prefect's reconnection attempts, minutes). The next run
   finds the version processed and does nothing.
Either way the version is registered and decided exactly once: the registry, not Prefect, is the record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moecl.data.validate import task_folder_hash
from moecl.errors import IntegrityError
from moecl.registry import Registry
from moecl.testing import (
    NO_MODEL,
    assert_consistent,
    decisions,
    land,
    make_task,
    no_training,
    sentiment_task,
    tree,
)

ROOT = Path(__file__).resolve().parents[1]
# the workspaces and flow_server of tests/conftest.py: champion v0001 knows `topics`; each test works on a copy
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A run of the self_evolve flow in its own process, on the tiny model, against PREFECT_API_URL. With a fault, the
# server (process group MOECL_SERVER_PID) is stopped at that point of the run, and the run goes on without it.
CHILD = r"""
import os, signal, sys, time, urllib.request
sys.path.insert(0, os.environ["MOECL_REPO"])
import torch
torch.set_num_threads(1)
from moecl import evolve
from moecl.testing import tiny_base
from flows.self_evolve import injected_base, self_evolve

def stop_server():
    os.killpg(int(os.environ["MOECL_SERVER_PID"]), signal.SIGTERM)
    url = os.environ["PREFECT_API_URL"] + "/health"
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1)
        except OSError:
            print("moecl-test: the Prefect server is gone", flush=True)
            return
        time.sleep(0.1)
    raise SystemExit("the server did not stop")

fault = sys.argv[1]
if fault == "before-sub-run":
    pending = evolve.pending_versions
    def pending_then_lose_server(*args, **kwargs):
        found = pending(*args, **kwargs)
        stop_server()
        return found
    evolve.pending_versions = pending_then_lose_server
elif fault == "during-step":
    train = evolve.train_challenger
    def train_without_server(*args, **kwargs):
        stop_server()
        time.sleep(6)  # past Prefect's 5 s cache of "no tag limits": the next stages meet the dead server
        return train(*args, **kwargs)
    evolve.train_challenger = train_without_server
with injected_base(tiny_base()):
    state = self_evolve(params_path="params.yaml", return_state=True)
print(f"moecl-test: flow state {state.name}: {state.message}", flush=True)
sys.exit(0 if state.is_completed() else 3)
"""


def _run_child(ws: Path, env: dict, fault: str, log: Path, timeout: float = 420) -> int:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, fault],
            cwd=ws,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)
            raise AssertionError(
                f"the run did not end in {timeout:.0f} s:\n{log.read_text()[-4000:]}"
            ) from None


@pytest.mark.slow
def test_the_prefect_api_going_away_mid_run_loses_no_version_and_processes_none_twice(ws, tmp_path):
    from flows.server import start_server
    from moecl.io import free_port

    version = task_folder_hash(land(ws, sentiment_task()))
    champion_file = ws / "registry" / "champion.json"
    old_champion = champion_file.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        MOECL_REPO=str(ROOT),
        PREFECT_HOME=str(tmp_path / "prefect-home"),  # one history database for the three servers
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_TO_API_ENABLED="false",  # the test reads the registry, not the logs
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    timings = []

    def run(fault: str, name: str) -> tuple[int, str]:
        port = free_port()
        t0 = time.monotonic()
        server = start_server(port=port, log_path=tmp_path / f"{name}-server.log", timeout=180, env=env)
        timings.append(f"server {server.seconds_to_healthy:.0f} s")
        child_env = {**env, "PREFECT_API_URL": server.url, "MOECL_SERVER_PID": str(server.process.pid)}
        log = tmp_path / f"{name}.log"
        try:
            code = _run_child(ws, child_env, fault, log)
        finally:
            server.stop()
        timings.append(f"{name} {time.monotonic() - t0:.0f} s")
        return code, log.read_text(errors="replace")

    registry = Registry(ws / "registry", ws)

    # 1. the server stops before the version's sub-run starts: the run fails, the workspace is as it was
    before = tree(ws)
    code, log = run("before-sub-run", "outage-before-sub-run")
    assert "moecl-test: the Prefect server is gone" in log, log[-4000:]
    assert code != 0 and "moecl-test: flow state" not in log, log[-4000:]
    assert tree(ws) == before
    assert registry.processed("sentiment", version) is None  # still pending: the next run takes it

    # 2. a server again; it stops while the step trains: the run goes on, decides the version, then fails
    code, log = run("during-step", "outage-during-step")
    assert "moecl-test: the Prefect server is gone" in log, log[-4000:]
    assert code != 0, log[-4000:]
    assert registry.champion().version == "v0002" and champion_file.read_bytes() != old_champion
    assert decisions(registry, "v0002") == ["registered", "promoted"]
    assert registry.processed("sentiment", version).version == "v0002"
    assert_consistent(ws)

    # 3. the next run, with a server: nothing left to do; the version was processed exactly once
    before = tree(ws / "registry")
    code, log = run("none", "after-the-outages")
    assert code == 0 and "moecl-test: flow state Completed" in log, log[-4000:]
    assert tree(ws / "registry") == before
    assert [r.version for r in registry.list_versions() if r.task_id == "sentiment"] == ["v0002"]
    assert [e["event"] for e in registry.history_events() if e.get("version") == "v0002"] == [
        "registered",
        "promoted",
    ]
    print(f"\n[timing] {', '.join(timings)}")


# --- the flow refuses a corrupted champion ----------------------------------------------------------------------------
@pytest.mark.slow
def test_the_flow_records_a_version_as_failed_for_integrity_and_keeps_the_champion(
    flow_server, ws, monkeypatch
):
    from flows.self_evolve import injected_base, process_dataset_version

    land(ws, make_task("sentiment", ["positive", "negative"]))
    version = task_folder_hash(ws / "data" / "tasks" / "sentiment")
    registry = Registry(ws / "registry", ws)
    bank = registry.bank_path(registry.champion())
    data = bytearray((bank / "expert-topics.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x10
    (bank / "expert-topics.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr("moecl.train.launch.launch_step", no_training)
    before = tree(ws)
    with injected_base(NO_MODEL):
        state = process_dataset_version("sentiment", version, return_state=True)
    assert state.is_failed()
    assert "IntegrityError" in state.message and "expert-topics.safetensors: sha256 mismatch" in state.message
    with pytest.raises(IntegrityError):
        state.result()
    after = tree(ws)
    assert {k for k in set(before) | set(after) if before.get(k) != after.get(k)} == {"registry/events.jsonl"}
    (failure,) = registry.failures("sentiment", version)
    assert failure["reason"] == "integrity"
    assert json.loads((ws / "registry" / "champion.json").read_text())["version"] == "v0001"
    assert registry.processed("sentiment", version) is None  # still pending

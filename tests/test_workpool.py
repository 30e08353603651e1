"""The self-evolution deployments on a Prefect work pool, run by a real `prefect worker` process (slow), and the
cheap parts of `moecl deploy`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows import artifacts as art
from moecl.testing import FAR_CRON, write_task_folder

ROOT = Path(__file__).resolve().parents[1]
POOL = "moecl-test-pool"


def test_job_variable_values_are_json_where_they_parse():
    import argparse

    from flows.deployments import worker_command
    from moecl.commands.flows import _job_variable

    assert _job_variable("image=registry.local/moecl:1") == ("image", "registry.local/moecl:1")
    assert _job_variable('volumes=["/srv/moecl:/srv/moecl"]') == ("volumes", ["/srv/moecl:/srv/moecl"])
    assert _job_variable("stream_output=false") == ("stream_output", False)
    assert _job_variable("working_dir=") == ("working_dir", "")
    with pytest.raises(argparse.ArgumentTypeError):
        _job_variable("no-equals-sign")
    assert worker_command("gpu pool") == "prefect worker start --pool 'gpu pool'"
    assert worker_command("p", limit=2) == "prefect worker start --pool p --limit 2"


def _wait(predicate, timeout, what, step=1.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _stop(process: subprocess.Popen | None, grace: float = 20.0) -> None:
    """End a process we started in its own session, and whatever it started (a worker's flow-run processes
    run in process groups of their own)."""
    if process is None:
        return
    import psutil

    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@pytest.mark.slow
def test_worker_of_a_process_pool_runs_the_triggered_deployment(tmp_path, tiny_tok, two_tasks):
    """`moecl deploy --pool` on a real local server, a `moecl.dataset.landed` event from `moecl data publish`,
    and `prefect worker start --run-once` in another folder: the run works in the project and promotes."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.server import healthy, start_server
    from moecl.data.validate import task_folder_hash
    from moecl.io import free_port
    from moecl.testing import tiny_llama

    t0 = time.monotonic()
    project = tmp_path / "project"  # the shared workspace: params, data, registry, banks
    model_dir = (
        tmp_path / "tiny-model"
    )  # a real model folder: the worker's process cannot be handed a BaseSpec
    tiny_llama(len(tiny_tok)).save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    write_task_folder(project / "data" / "tasks", two_tasks[0])
    (project / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(model_dir)},
                "train": {"epochs": 1, "lr": 0.005, "max_length": 64, "evals_per_epoch": 1, "threads": 2},
                "evaluate": {"fwt": False},
                "flow": {"poll_cron": FAR_CRON, "concurrency_limit": 1},  # the poll never fires here
            }
        )
    )
    version = task_folder_hash(project / "data" / "tasks" / "topics")
    worker_host = (
        tmp_path / "worker-host"
    )  # the worker starts elsewhere: only working_dir leads to the project
    worker_host.mkdir()

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / ".prefect"),
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT),
    )
    server = worker = None
    worker_log = tmp_path / "worker.log"
    timings = {}
    try:
        server = start_server(port=free_port(), log_path=tmp_path / "server.log", timeout=120, env=env)
        url = server.url
        env["PREFECT_API_URL"] = url
        timings["server healthy"] = server.seconds_to_healthy

        t = time.monotonic()
        deployed = subprocess.run(
            [sys.executable, "-m", "moecl", "deploy", "--pool", POOL, "--json"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )
        timings["moecl deploy"] = time.monotonic() - t
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        result = json.loads(deployed.stdout)
        assert result["pool"] == POOL and result["pool_type"] == "process" and result["created_pool"]
        assert set(result["deployments"]) == {"self-evolve/poll", "self-evolve/on-dataset-landed"}
        assert result["job_variables"] == {"working_dir": str(project.resolve())}
        assert result["worker_command"] == f"prefect worker start --pool {POOL}"

        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            pool = client.read_work_pool(POOL)
            assert pool.type == "process"
            for deployment_id in result["deployments"].values():
                d = client.read_deployment(deployment_id)
                assert d.work_pool_name == POOL and d.entrypoint == "flows.self_evolve.self_evolve"
                assert d.job_variables == {"working_dir": str(project.resolve())} and not d.pull_steps
                assert d.parameters == {"params_path": "params.yaml"}
                assert d.global_concurrency_limit is not None and d.global_concurrency_limit.limit == 1
            poll = client.read_deployment_by_name("self-evolve/poll")
            assert poll.schedules and poll.schedules[0].schedule.cron == FAR_CRON

            t_publish = time.monotonic()
            publish = subprocess.run(
                [sys.executable, "-m", "moecl", "data", "publish"],
                cwd=project,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            timings["moecl data publish"] = time.monotonic() - t_publish
            assert publish.returncode == 0, publish.stderr[-3000:]

            def scheduled_run():
                runs = client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["self-evolve"]))
                )
                return runs[0] if runs else None

            run = _wait(scheduled_run, 90, "the automation to create the triggered flow run")
            timings["publish -> run created"] = time.monotonic() - t_publish
            assert run.parameters == {
                "params_path": "params.yaml",
                "task_id": "topics",
                "data_version": version,
            }
            assert run.work_pool_name == POOL and run.deployment_id is not None

            t_worker = time.monotonic()
            with open(worker_log, "wb") as log:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--run-once"],
                    cwd=worker_host,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                worker.wait(timeout=240)  # --run-once: one poll, then it waits for the runs it started
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the worker did not finish in 240 s:\n{_tail(worker_log)}") from None
            timings["worker start -> exit"] = time.monotonic() - t_worker
            assert worker.returncode == 0, _tail(worker_log)

            done = client.read_flow_run(run.id)
            assert done.state.is_completed(), f"{done.state.name}: {done.state.message}\n{_tail(worker_log)}"
            (sub,) = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["process-dataset-version"]))
            )
            assert sub.name == f"topics@{version[:10]}" and sub.state.is_completed()
            keys = {
                a.key
                for a in client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[sub.id]))
                )
            }
            assert {
                art.KEY_SUMMARY,
                art.KEY_RECORD,
                art.KEY_MATRIX,
            } <= keys  # in the API DB: any host reads them

        champion = json.loads((project / "registry" / "champion.json").read_text())
        assert champion["version"] == "v0001"
        assert not (worker_host / "registry").exists() and not (worker_host / "banks").exists()
        timings["total"] = time.monotonic() - t0
        print("\n[timing] work pool: " + "; ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    finally:
        _stop(worker)
        if server is not None:
            server.stop()
    assert not healthy(server.url), "the test's Prefect server is still running"

"""The Prefect faces: artifact builders, deployments, events, hooks (cheap), then the whole flow under a test
harness and a real local server with the event-triggered deployment (slow)."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from flows import artifacts as art
from moecl.cli import main
from moecl.testing import FAR_CRON, write_task_folder

ROOT = Path(__file__).resolve().parents[1]

OUTCOME = {
    "task_id": "sentiment",
    "data_version": "0123456789abcdef" * 4,
    "decision": "reject",
    "reasons": ["forgetting: topics dropped 0.200 > 0.050"],
    "version": "v0002",
    "bank_dir": "banks/b2",
    "champion_before": "v0001",
    "champion_after": "v0001",
    "metrics": {
        "acc": 0.7,
        "bwt": -0.2,
        "fwt": None,
        "per_task": {"topics": 0.6, "sentiment": 0.8},
        "order": ["topics", "sentiment"],
        "steps": ["topics", "sentiment"],
        "matrix": [[0.8, None], [0.6, 0.8]],
    },
    "gate": {
        "decision": "reject",
        "reasons": ["forgetting"],
        "checks": [
            {"name": "forgetting:topics", "passed": False, "value": 0.6, "threshold": 0.75, "detail": "a | b"}
        ],
    },
    "drift": {"has_reference": False, "note": "new task"},
    "report_path": "reports/drift-sentiment.html",
}


# --- artifact builders (pure) ---------------------------------------------------------------------------------------
def test_artifact_keys_are_stable_and_valid():
    assert all(art.valid_key(k) for k in art.KEYS) and len(set(art.KEYS)) == len(art.KEYS)
    assert not art.valid_key("Bad_Key") and not art.valid_key("trailing-")


def test_summary_markdown_says_decision_why_metrics_and_champions():
    md = art.summary_markdown(OUTCOME)
    assert md.startswith("# sentiment@0123456789: REJECT")
    assert "v0001 -> v0001" in md and "0.700 / -0.200 / n/a" in md
    assert "- forgetting: topics dropped 0.200 > 0.050" in md
    assert "a \\| b" in md  # table cells are escaped
    assert "new task" in md
    skipped = art.summary_markdown(
        {
            "task_id": "t",
            "data_version": "ab",
            "decision": "skipped",
            "reasons": ["already processed as v0001"],
        }
    )
    assert "SKIPPED" in skipped and "ACC" not in skipped


def test_matrix_and_per_task_rows():
    assert art.matrix_rows(OUTCOME["metrics"]) == [
        {"after step": "1. topics", "topics": 0.8, "sentiment": None},
        {"after step": "2. sentiment", "topics": 0.6, "sentiment": 0.8},
    ]
    rows = art.per_task_rows(OUTCOME["metrics"], {"topics": 0.8})
    assert rows == [
        {"task": "topics", "challenger": 0.6, "champion": 0.8, "delta": -0.2},
        {"task": "sentiment", "challenger": 0.8, "champion": None, "delta": None},
    ]
    assert art.per_task_rows({"per_task": {"a": 0.5}}, None)[0]["champion"] is None


def test_run_record_history_row_and_table():
    rec = art.run_record(OUTCOME)
    assert rec["decision"] == "reject" and rec["acc"] == 0.7 and rec["champion_after"] == "v0001"
    assert set(rec) == set(art.RECORD_FIELDS)
    run = {
        "id": "r1",
        "name": "sentiment@0123456789",
        "state": "Completed",
        "start_time": "2026-11-28T10:00:00+00:00",
        "parameters": {"task_id": "sentiment"},
    }
    row = art.history_row(run, rec)
    assert row["task_id"] == "sentiment" and row["version"] == "v0002" and row["state"] == "Completed"
    failed = art.history_row({**run, "state": "Failed", "state_message": "invalid data"}, None)
    assert failed["decision"] is None and failed["reasons"] == "invalid data"
    text = art.format_history([row, failed])
    assert "Rejected" in text and "+0.700" not in text and "-0.200" in text and "v0001 -> v0001" in text
    assert "forgetting: topics dropped 0.200 > 0.050" in text  # why, the state message's words
    assert text.splitlines()[0].split() == [
        "when",
        "task",
        "version",
        "state",
        "ACC",
        "BWT",
        "champion",
        "why",
    ]
    named = art.format_history([{**row, "state": "Rejected"}])
    assert named.splitlines()[1].split()[4] == "Rejected"
    crashed = art.format_history([{**row, "state": "Crashed", "decision": None}])
    assert crashed.splitlines()[1].split()[4] == "Crashed"


def test_decision_state_names_and_messages():
    assert [
        art.decision_state_name(d) for d in ("promote", "reject", "skipped", "superseded", "invalid")
    ] == [
        "Promoted",
        "Rejected",
        "Skipped",
        "Superseded",
        "Invalid data",
    ]
    assert art.decision_message(["a", "b"]) == "a; b" and art.decision_message([]) == "(no reason given)"
    long = art.decision_message("x" * 2000)
    assert len(long) == art.STATE_MESSAGE_CHARS and long.endswith("...")


def test_invalid_and_batch_markdown():
    md = art.invalid_markdown(
        "broken", "abc", "task data failed validation:\n  train.jsonl:2: label: missing"
    )
    assert "INVALID DATA" in md and "train.jsonl:2: label: missing" in md and "untouched" in md
    batch = art.batch_markdown(
        [
            {
                "task_id": "t",
                "data_version": "abcdef",
                "state": "Completed",
                "decision": "promote",
                "champion_before": None,
                "champion_after": "v0001",
            }
        ]
    )
    assert "| t | `abcdef` | Completed | promote | none -> v0001 |" in batch
    assert "nothing pending" in art.batch_markdown([])


# --- deployments, events, hooks, retries (no server) -----------------------------------------------------------------
def test_deployments_poll_on_cron_and_trigger_on_landed_event():
    from moecl.config import Params

    params = Params()
    params.flow.poll_cron = "*/5 * * * *"
    params.flow.concurrency_limit = 1
    from flows.deployments import LANDED_EVENT, build_deployments

    poll, trigger = build_deployments(params, params_path="p.yaml")
    assert poll.name == "poll" and trigger.name == "on-dataset-landed"
    assert poll.entrypoint == "flows.self_evolve.self_evolve"
    assert poll.schedules[0].schedule.cron == "*/5 * * * *" and not trigger.schedules
    for d in (poll, trigger):
        assert d.concurrency_limit == 1 and d.parameters == {"params_path": "p.yaml"}
    (t,) = trigger.triggers
    assert t.expect == {LANDED_EVENT} and t.match.model_dump() == {"prefect.resource.id": "moecl.dataset.*"}
    assert t.parameters["data_version"] == "{{ event.payload.data_version }}"


def test_trigger_parameters_render_from_the_event_payload():
    """What the server does with the trigger's parameters (prefect 3.9 RunDeployment.render_parameters)."""
    from prefect.events import Event
    from prefect.server.events.actions import RunDeployment
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    from flows.deployments import landed_trigger

    params = copy.deepcopy(landed_trigger("params.yaml").parameters)
    RunDeployment._upgrade_v1_templates(params)
    event = Event(
        event="moecl.dataset.landed",
        resource={"prefect.resource.id": "moecl.dataset.topics"},
        payload={"task_id": "topics", "data_version": "abc123"},
    )
    rendered = hydrate(params, HydrationContext(render_jinja=True, jinja_context={"event": event}))
    assert rendered == {"params_path": "params.yaml", "task_id": "topics", "data_version": "abc123"}
    missing = Event(
        event="moecl.dataset.landed", resource={"prefect.resource.id": "moecl.dataset.x"}, payload={}
    )
    rendered = hydrate(params, HydrationContext(render_jinja=True, jinja_context={"event": missing}))
    # a payload without the fields does not render: the server fails that action, no run is created
    assert not isinstance(rendered["task_id"], str) and not isinstance(rendered["data_version"], str)


@pytest.fixture
def data_workspace(tmp_path, two_tasks, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_task_folder(tmp_path / "data" / "tasks", two_tasks[0])
    write_task_folder(tmp_path / "data" / "tasks", two_tasks[1])
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 5d41402abc4b2a76b9719d911017c592.dir\n  path: data\n")
    (tmp_path / "params.yaml").write_text(f"flow:\n  poll_cron: '{FAR_CRON}'\n")
    return tmp_path


def test_publish_dry_run_lists_one_event_per_pending_version(data_workspace, capsys):
    from moecl.data.validate import task_folder_hash

    assert main(["data", "publish", "--dry-run"]) == 0
    events = json.loads(capsys.readouterr().out)
    assert sorted(e["payload"]["task_id"] for e in events) == ["sentiment", "topics"]
    topics = next(e for e in events if e["payload"]["task_id"] == "topics")
    assert topics["event"] == "moecl.dataset.landed"
    assert topics["resource"]["prefect.resource.id"] == "moecl.dataset.topics"
    assert topics["payload"] == {
        "task_id": "topics",
        "data_dvc_md5": "5d41402abc4b2a76b9719d911017c592.dir",
        "data_version": task_folder_hash(data_workspace / "data" / "tasks" / "topics"),
    }
    assert main(["data", "publish", "--dry-run", "--task", "sentiment"]) == 0
    assert [e["payload"]["task_id"] for e in json.loads(capsys.readouterr().out)] == ["sentiment"]


def test_hooks_install_writes_a_post_commit_hook_and_keeps_an_existing_one(data_workspace, capsys):
    hooks = data_workspace / ".git" / "hooks"
    hooks.mkdir(parents=True)
    assert main(["hooks", "install"]) == 0
    hook = hooks / "post-commit"
    text = hook.read_text()
    assert os.access(hook, os.X_OK) and "grep -qx data.dvc" in text and "data publish" in text
    assert subprocess.run(["sh", "-n", str(hook)]).returncode == 0
    hook.write_text("#!/bin/sh\necho mine\n")
    assert main(["hooks", "install"]) == 2
    assert "--force" in capsys.readouterr().err and hook.read_text() == "#!/bin/sh\necho mine\n"
    assert main(["hooks", "install", "--force"]) == 0 and "data publish" in hook.read_text()


def test_retries_are_for_io_errors_only():
    from flows import self_evolve as se
    from moecl.data.validate import DataValidationError

    def state(exc):
        def result():
            raise exc

        return types.SimpleNamespace(result=result)

    assert se._io_error(None, None, state(OSError("disk"))) is True
    assert se._io_error(None, None, state(DataValidationError([]))) is False
    assert se._io_error(None, None, state(ValueError("bug"))) is False
    # each stage of evolve.process_version becomes a task with its own retries: I/O stages retried, never the
    # step, the evaluation or the recording of a decision
    seen = {}

    def task_options(fn, name, **options):
        seen[name] = options.get("retries", 0)
        return fn

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(se, "task", task_options)
        for name in ("validate", "load-base", "train", "evaluate", "record-decision"):
            se.prefect_stage(name, lambda: None)
    assert seen == {"validate": 2, "load-base": 2, "train": 0, "evaluate": 0, "record-decision": 0}


# --- the whole flow under a Prefect test harness ----------------------------------------------------------------
@pytest.fixture(scope="session")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    t0 = time.monotonic()
    with prefect_test_harness(server_startup_timeout=90):
        print(f"\n[timing] prefect_test_harness up in {time.monotonic() - t0:.1f} s")
        yield


def _write_params(root: Path, params) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params.to_dict()))
    return path


def _flow_runs(client, name):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[name])), sort=FlowRunSort.EXPECTED_START_TIME_ASC
    )


@pytest.mark.slow
def test_self_evolve_flow_promotes_rejects_skips_and_refuses_invalid_data(
    harness, tmp_path, monkeypatch, fast_params, two_tasks, tiny_base, capsys
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.self_evolve import VERSION_FLOW, WORKSPACE_LIMIT, VersionsFailed, injected_base, self_evolve
    from moecl.registry import Registry

    monkeypatch.chdir(tmp_path)
    params = copy.deepcopy(fast_params)
    params.data.root = "data/tasks"
    params.gate.max_task_drop, params.gate.min_bwt = (
        1.0,
        -1.0,
    )  # the tiny model is noisy: gate on what we construct
    params.gate.min_canary_agreement, params.gate.max_confidence_ks = 0.0, 1.0
    _write_params(tmp_path, params)
    write_task_folder(tmp_path / "data" / "tasks", two_tasks[0])
    registry = Registry(tmp_path / "registry", tmp_path)

    with injected_base(tiny_base):
        first = self_evolve()
        assert [(r["task_id"], r["decision"], r["champion_after"]) for r in first] == [
            ("topics", "promote", "v0001")
        ]
        champion_file = (tmp_path / "registry" / "champion.json").read_bytes()

        write_task_folder(tmp_path / "data" / "tasks", two_tasks[1])  # any challenger "forgets" against -0.5:
        second = self_evolve(overrides=["gate.max_task_drop=-0.5"])
        assert [(r["task_id"], r["decision"], r["state"]) for r in second] == [
            ("sentiment", "reject", "Rejected")
        ]
        assert registry.champion().version == "v0001"
        assert (tmp_path / "registry" / "champion.json").read_bytes() == champion_file
        assert registry.get("v0002").status == "rejected"

        capsys.readouterr()
        assert main(["evolve", "--json"]) == 0  # nothing pending any more
        assert json.loads(capsys.readouterr().out)["versions"] == []
        assert main(["evolve", "--task", "sentiment", "--json"]) == 0  # the same version again: does nothing
        again = json.loads(capsys.readouterr().out)["versions"]
        assert [r["decision"] for r in again] == ["skipped"] and len(registry.list_versions()) == 2
        stale = self_evolve(task_id="topics", data_version="0" * 64)  # an event for a version no longer there
        assert [r["decision"] for r in stale] == ["superseded"] and len(registry.list_versions()) == 2

        bad = tmp_path / "data" / "tasks" / "broken"
        bad.mkdir()
        (bad / "task.yaml").write_text("labels: [a, b]\n")
        (bad / "train.jsonl").write_text('{"text": "x", "label": "a"}\n{"text": "y"}\n')
        (bad / "test.jsonl").write_text('{"text": "z", "label": "b"}\n')
        registry_before = {p.name: p.read_bytes() for p in (tmp_path / "registry").rglob("*") if p.is_file()}
        state = self_evolve(task_id="broken", return_state=True)
        assert state.is_failed() and "broken@" in state.message
        failed = state.result(raise_on_failure=False)
        assert isinstance(failed, VersionsFailed) and failed.results[0]["state"] == "Invalid data"
        assert "train.jsonl:2: label" in failed.results[0]["message"]
        assert {
            p.name: p.read_bytes() for p in (tmp_path / "registry").rglob("*") if p.is_file()
        } == registry_before

    with get_client(sync_client=True) as client:
        runs = _flow_runs(client, VERSION_FLOW)
        # each version's run ends in a state named after its decision, of the Completed type (invalid: Failed)
        assert [(r.state.name, r.state.type.value) for r in runs] == [
            ("Promoted", "COMPLETED"),
            ("Rejected", "COMPLETED"),
            ("Skipped", "COMPLETED"),
            ("Superseded", "COMPLETED"),
            ("Invalid data", "FAILED"),
        ]
        promote_run, reject_run, skip_run, superseded_run, invalid_run = runs
        assert promote_run.name == f"topics@{first[0]['data_version'][:10]}"
        assert registry.get("v0001").flow_run_id == str(promote_run.id)
        # the state message is the reason
        assert reject_run.state.message == "; ".join(registry.get("v0002").gate["reasons"])
        assert "forgetting" in reject_run.state.message
        assert skip_run.state.message == "already processed as v0002"
        assert "the workspace holds" in superseded_run.state.message
        assert (
            "invalid data" in invalid_run.state.message
            and "train.jsonl:2: label" in invalid_run.state.message
        )
        keys = {
            a.key
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[promote_run.id]))
            )
        }
        assert {
            art.KEY_SUMMARY,
            art.KEY_RECORD,
            art.KEY_MATRIX,
            art.KEY_PER_TASK,
            art.KEY_DRIFT_REPORT,
            art.KEY_BANK,
        } <= keys
        invalid_artifacts = {
            a.key: a
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[invalid_run.id]))
            )
        }
        assert "INVALID DATA" in invalid_artifacts[art.KEY_SUMMARY].data
        limit = client.read_global_concurrency_limit_by_name(WORKSPACE_LIMIT)
        assert limit.limit == 1 and limit.active_slots == 0

    capsys.readouterr()
    assert main(["history", "--json", "--limit", "10"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["task_id"], r["decision"], r["state"]) for r in rows] == [
        ("broken", "invalid", "Invalid data"),
        ("topics", "superseded", "Superseded"),
        ("sentiment", "skipped", "Skipped"),
        ("sentiment", "reject", "Rejected"),
        ("topics", "promote", "Promoted"),
    ]
    assert rows[3]["champion_before"] == rows[3]["champion_after"] == "v0001" and rows[3]["acc"] is not None
    assert rows[4]["champion_before"] is None and rows[4]["champion_after"] == "v0001"
    assert rows[3]["reasons"] == reject_run.state.message  # the same words as the Prefect state
    assert main(["history"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[4] for line in table[1:]] == [
        "Invalid",
        "Superseded",
        "Skipped",
        "Rejected",
        "Promoted",
    ]
    assert reject_run.state.message[:40] in table[4]


# --- a real local server, the served deployments and an event ----------------------------------------------------
def _wait(predicate, timeout, what, step=1.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _stop_orphaned_server(log_path: Path) -> None:
    """If `moecl serve` died without stopping the server it started, stop it (its pid is in the log)."""
    import re

    match = re.search(r"server pid (\d+)", log_path.read_text(errors="replace"))
    if match:
        try:
            os.killpg(int(match.group(1)), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.slow
def test_served_deployment_runs_when_a_dataset_lands(tmp_path, tiny_tok, two_tasks):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.server import api_url, healthy
    from moecl.data.validate import task_folder_hash
    from moecl.io import free_port
    from moecl.testing import tiny_llama

    model_dir = tmp_path / "tiny-model"
    tiny_llama(len(tiny_tok)).save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    write_task_folder(tmp_path / "data" / "tasks", two_tasks[0])
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(model_dir)},
                "train": {"epochs": 1, "lr": 0.005, "max_length": 64, "evals_per_epoch": 1},
                "evaluate": {"fwt": False},
                "flow": {
                    "poll_cron": FAR_CRON,
                    "concurrency_limit": 1,
                },  # the poll never fires during the test
            }
        )
    )
    version = task_folder_hash(tmp_path / "data" / "tasks" / "topics")
    port = free_port()
    url = api_url("127.0.0.1", port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / ".prefect"),
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
    )
    log = open(tmp_path / "serve.log", "wb")
    t0 = time.monotonic()
    # A process started in the background of a non-interactive shell (`make test &`) ignores SIGINT, and its
    # children inherit that; a caught handler is reset to the default by exec, so with one installed here the
    # Ctrl-C below reaches `moecl serve` however the tests were launched.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        serve = subprocess.Popen(
            [sys.executable, "-m", "moecl", "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        _wait(lambda: healthy(url) or serve.poll() is not None, 120, "the local server")
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        t_server = time.monotonic() - t0
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            _wait(
                lambda: client.read_deployments(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["on-dataset-landed"]))
                ),
                90,
                "the served deployments",
            )
            t_served = time.monotonic() - t0
            t_publish = time.time()
            publish = subprocess.run(
                [sys.executable, "-m", "moecl", "data", "publish"],
                cwd=tmp_path,
                env={**env, "PREFECT_API_URL": url},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert publish.returncode == 0, publish.stderr
            assert f"topics@{version[:10]}" in publish.stdout
            t_emit = time.monotonic()
            t_publish_cli = time.time() - t_publish

            def triggered():
                # the poll deployment's future (yearly) runs are listed too, as Scheduled: not the trigger's
                runs = [r for r in _flow_runs(client, "self-evolve") if r.parameters.get("task_id")]
                return runs[0] if runs else None

            run = _wait(triggered, 120, "a flow run of the triggered deployment")
            t_trigger = run.created.timestamp() - t_publish  # from starting `moecl data publish`
            assert run.parameters["task_id"] == "topics" and run.parameters["data_version"] == version

            def finished():
                r = client.read_flow_run(run.id)
                return r if r.state and r.state.is_final() else None

            done = _wait(finished, 150, "the triggered run to finish", step=2.0)
            t_run = time.monotonic() - t_emit
            assert done.state.is_completed(), done.state.message
            (sub,) = _flow_runs(client, "process-dataset-version")
            assert sub.name == f"topics@{version[:10]}" and sub.state.is_completed()
        champion = json.loads((tmp_path / "registry" / "champion.json").read_text())
        assert champion["version"] == "v0001"
        print(
            f"\n[timing] moecl serve: server healthy {t_server:.1f} s, deployments served {t_served:.1f} s; "
            f"`moecl data publish` {t_publish_cli:.1f} s; publish start -> run created {t_trigger:.1f} s; "
            f"publish end -> run finished {t_run:.1f} s"
        )
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C: stop serving, then the server it started
            try:
                serve.wait(timeout=150)  # stopping the served runner, then its server, can take a while
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait(timeout=10)
        log.close()
        _stop_orphaned_server(tmp_path / "serve.log")
    assert serve.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert not healthy(url), "the server started by moecl serve is still running"

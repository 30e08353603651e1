"""Reliability and security, each checked by injecting the fault (docs/operations.md says what happens on call).

1. bad data versions of every kind are refused before any training, by the library path and by the flow, and
   change nothing;
2. SIGKILL mid-training, mid-bank-write and at three points of a promotion leaves nothing half-written, and
   the next run finishes the version exactly once;
3. concurrent triggers are processed one at a time, each version once; a burst of ten versions is processed in
   landing order, none lost;
4. loading is safetensors + JSON only, no remote code by default, the local server listens on 127.0.0.1, and no
   record text reaches logs, artifacts, metrics, plots, reports, banks or the registry records.

Every workspace here uses relative paths (data/tasks, banks, registry, metrics, ...) and the test runs in it, so
"nothing else was written" is a comparison of the whole folder. Kills are real SIGKILLs of separate processes
(tests/faults.py). Runs use one torch thread: on two shared cores more threads only wait for each other.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

# Prefect reads its settings on first import: keep this session's Prefect files out of ~/.prefect.
if "prefect" not in sys.modules and not os.environ.get("PREFECT_HOME"):
    _home = tempfile.mkdtemp(prefix="moecl-prefect-home-")
    os.environ["PREFECT_HOME"] = _home
    atexit.register(shutil.rmtree, _home, True)

from moecl.cli import main  # noqa: E402
from moecl.config import Params, load_params  # noqa: E402
from moecl.data.validate import (  # noqa: E402
    DataValidationError,
    load_task,
    task_folder_hash,
    task_id_issues,
    validate_task_folder,
)
from moecl.evolve import Outputs, evolve_pending, process_version, version_for  # noqa: E402
from moecl.model.base import BaseSpec  # noqa: E402
from moecl.registry import Registry  # noqa: E402
from moecl.testing import make_task  # noqa: E402
from tests.test_cli_core import write_task_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["sports", "business", "science"]
MARK = "zqx-secret-marker-7731"  # put into record texts that must never be echoed anywhere
# the tqdm line of a step once it has taken at least one optimisation step
TRAINING = re.compile(r"train (\S+):\s+\d+%\|[^|\n\r]*\|\s*([1-9]\d*)/\d+")
PATH_LIKE_IDS = ["../x", "a/b", "..", "x/../../y", "/ABS", "Upper", "", "a" * 65]


# --- workspaces ------------------------------------------------------------------------------------------------------
def fast_params() -> Params:
    """Tiny, fast, relative paths; gates relaxed (the tiny model is noisy: these tests gate on what they inject)."""
    p = Params()
    p.data.root, p.registry.root, p.registry.banks_dir = "data/tasks", "registry", "banks"
    p.train.epochs, p.train.lr, p.train.batch_size, p.train.max_length = 1, 5e-3, 8, 48
    p.train.evals_per_epoch, p.train.threads = 1, 1
    p.evaluate.max_new_tokens, p.evaluate.fwt = 3, False
    p.gate.max_task_drop, p.gate.min_bwt = 1.0, -1.0
    p.gate.min_canary_agreement, p.gate.max_confidence_ks, p.gate.canary_per_task = 0.0, 1.0, 4
    return p


def write_params(root: Path, params: Params) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))


def tree(root: Path) -> dict[str, bytes]:
    """Every file and folder under root (folders as b'<dir>'): equal trees = nothing written."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(root.rglob("*"))
    }


def registry_state(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(root).items() if k.startswith("registry/")}


def land(root: Path, task, *, replace: bool = False) -> Path:
    folder = root / "data" / "tasks" / task.task_id
    if replace and folder.exists():
        shutil.rmtree(folder)
    return write_task_folder(root / "data" / "tasks", task)


def run_library(params: Params, base) -> list:
    return evolve_pending(
        params, base=base, registry=Registry.from_params(params), outputs=Outputs(Path(".")), progress=False
    )


def decisions(registry: Registry, version: str) -> list[str]:
    return [e["event"] for e in registry.history_events(version)]


def assert_consistent(root: Path) -> None:
    """What a reader may see after any crash: whole banks, whole registry files, a champion that exists, whole
    metrics and plots. A temporary file or folder of an interrupted write is hidden (its name starts with '.')."""
    for entry in (root / "banks").iterdir():
        if entry.name.startswith("."):
            continue
        manifest = json.loads((entry / "bank.json").read_text())
        assert all((entry / t["file"]).is_file() for t in manifest["tasks"]), entry
    registry = Registry(root / "registry", root)
    for record in registry.list_versions():
        assert registry.bank_path(record).is_dir(), record.version
    for line in (root / "registry" / "events.jsonl").read_text().splitlines():
        json.loads(line)
    champion = json.loads((root / "registry" / "champion.json").read_text())
    for version in [champion["version"], *champion["previous"]]:
        assert registry.bank_path(registry.get(version)).is_dir()
    for path in (root / "metrics").glob("*.json"):
        json.loads(path.read_text())
    for path in (root / "plots").glob("*.png"):
        assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), f"torn PNG {path}"
    for folder in ("metrics", "plots", "reports", "registry"):
        for path in (root / folder).rglob("*"):
            assert path.name.startswith(".") or ".tmp" not in path.name, f"visible temporary file {path}"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def champion_ws(request, tmp_path_factory, tiny_base):
    """A workspace whose champion v0001 knows `topics` (built once; each test works on a copy)."""
    from tests import faults

    if any(name in item.name for item in request.session.items for name in ("sigkill", "concurrent")):
        faults.context()  # the fork server preloads in the background while the in-process tests run
    root = tmp_path_factory.mktemp("champion") / "ws"
    root.mkdir()
    params = fast_params()
    write_params(root, params)
    land(root, make_task("topics", TOPICS))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert [o.decision for o in run_library(params, tiny_base)] == ["promote"]
    finally:
        os.chdir(cwd)
    assert faults.tiny_base_spec().sha256 == tiny_base.sha256  # the processes' banks load here
    return root


@pytest.fixture
def ws(champion_ws, tmp_path, monkeypatch):
    root = tmp_path / "ws"
    shutil.copytree(champion_ws, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


def _never(*args, **kwargs):
    raise AssertionError("training started")


def _no_model():
    raise AssertionError("the base model was loaded")


NO_MODEL = BaseSpec("no-model", "0" * 64, _no_model)  # a version refused by validation never loads a model


# --- 1. bad data ------------------------------------------------------------------------------------------------------
def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _set_line(path: Path, number: int, line: str | bytes) -> None:
    lines = _lines(path)
    lines[number - 1] = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(b"\n".join(lines) + b"\n")


def _record(number: int, folder: Path, split: str = "train") -> dict:
    return json.loads(_lines(folder / f"{split}.jsonl")[number - 1])


def _single_label(folder: Path, labels: list[str]) -> None:
    path = folder / "train.jsonl"
    records = [json.loads(x) for x in _lines(path)]
    path.write_text("".join(json.dumps({**r, "label": labels[0]}) + "\n" for r in records))


def _leak(folder: Path, labels: list[str]) -> None:
    first = _record(1, folder)
    _set_line(folder / "train.jsonl", 1, json.dumps({**first, "text": f"{MARK} leaked"}))
    _set_line(folder / "test.jsonl", 1, json.dumps({"text": f"{MARK} leaked", "label": labels[0]}))


@dataclasses.dataclass(frozen=True)
class Defect:
    mutate: Callable[[Path, list[str]], None]
    file: str | None  # None: the folder itself
    line: int | None  # -1: some line (a YAML parser's), None: the whole file
    field: str | None
    message: str  # regex
    folder_name: str | None = None  # the defect is the folder's name (new tasks only)


DEFECTS = {
    "malformed-json": Defect(
        lambda f, labels: _set_line(f / "train.jsonl", 2, f'{{"text": "{MARK}", "label": '),
        "train.jsonl",
        2,
        None,
        "not valid JSON",
    ),
    "non-utf8": Defect(
        lambda f, labels: _set_line(
            f / "train.jsonl",
            3,
            b'{"text": "caf\xe9 ' + MARK.encode() + b'", "label": "' + labels[0].encode() + b'"}',
        ),
        "train.jsonl",
        3,
        None,
        r"not valid UTF-8 \(byte 0xe9",
    ),
    "blank-line": Defect(
        lambda f, labels: _set_line(f / "train.jsonl", 2, ""), "train.jsonl", 2, None, "blank line"
    ),
    "not-an-object": Defect(
        lambda f, labels: _set_line(f / "test.jsonl", 1, json.dumps([MARK, labels[0]])),
        "test.jsonl",
        1,
        None,
        "must be a JSON object",
    ),
    "missing-field": Defect(
        lambda f, labels: _set_line(f / "train.jsonl", 4, json.dumps({"text": MARK})),
        "train.jsonl",
        4,
        "label",
        "^missing$",
    ),
    "wrong-type": Defect(
        lambda f, labels: _set_line(f / "test.jsonl", 2, json.dumps({"text": 42, "label": labels[0]})),
        "test.jsonl",
        2,
        "text",
        "must be a string, got int",
    ),
    "unknown-field": Defect(
        lambda f, labels: _set_line(f / "train.jsonl", 1, json.dumps({**_record(1, f), "lable": MARK})),
        "train.jsonl",
        1,
        "lable",
        "unknown field",
    ),
    "unknown-label": Defect(
        lambda f, labels: _set_line(
            f / "train.jsonl", 5, json.dumps({"text": MARK, "label": "no-such-label"})
        ),
        "train.jsonl",
        5,
        "label",
        "'no-such-label' is not a declared label",
    ),
    "empty-train": Defect(
        lambda f, labels: (f / "train.jsonl").write_bytes(b""), "train.jsonl", None, None, "empty file"
    ),
    "empty-test": Defect(
        lambda f, labels: (f / "test.jsonl").write_bytes(b"\n\n"), "test.jsonl", None, None, "empty file"
    ),
    "single-label-train": Defect(_single_label, "train.jsonl", None, "label", "only 1 distinct label"),
    "train-test-leakage": Defect(
        _leak, "test.jsonl", 1, "text", r"same text as train.jsonl line 1 \(leakage"
    ),
    "huge-record": Defect(
        lambda f, labels: _set_line(
            f / "train.jsonl", 6, json.dumps({"text": MARK + " x" * 10_001, "label": _record(6, f)["label"]})
        ),
        "train.jsonl",
        6,
        "text",
        r"\d+ characters, more than data.max_text_chars=20000",
    ),
    "missing-task-yaml": Defect(
        lambda f, labels: (f / "task.yaml").unlink(), "task.yaml", None, None, "missing"
    ),
    "malformed-task-yaml": Defect(
        lambda f, labels: (f / "task.yaml").write_text("labels: [a, b\ninstruction: x\n"),
        "task.yaml",
        -1,
        None,
        "not valid YAML",
    ),
    "missing-test-split": Defect(
        lambda f, labels: (f / "test.jsonl").unlink(),
        "test.jsonl",
        None,
        None,
        "missing: a task needs test.jsonl",
    ),
    "invalid-task-id": Defect(
        lambda f, labels: None, None, None, "task_id", "not a valid task id", folder_name="Bad.Task"
    ),
}
TARGETS = ("new-task", "known-task")  # a new task's first version; a new version of the champion's task
CASES = [
    pytest.param(kind, target, id=f"{kind}-{target}")
    for kind in DEFECTS
    for target in TARGETS
    if not (DEFECTS[kind].folder_name and target == "known-task")
]


def land_bad_version(root: Path, kind: str, target: str) -> Path:
    defect = DEFECTS[kind]
    if target == "known-task":
        task, labels = make_task("topics", TOPICS, seed=7), TOPICS
    else:
        labels = ["spam", "ham"]
        task = make_task(defect.folder_name or "fresh", labels)
    folder = land(root, task, replace=True)
    defect.mutate(folder, labels)
    return folder


def assert_names_the_defect(exc: DataValidationError, folder: Path, kind: str) -> None:
    defect = DEFECTS[kind]
    where = f"{folder.name}/{defect.file}" if defect.file else folder.name
    found = [
        i
        for i in exc.issues
        if i.file.endswith(where)
        and (i.line == defect.line or (defect.line == -1 and isinstance(i.line, int)))
        and i.field == defect.field
        and re.search(defect.message, i.message)
    ]
    assert found, f"no issue {where}:{defect.line}: {defect.field}: /{defect.message}/ in\n{exc}"
    assert str(found[0]) in str(exc)  # the message names file:line: field:
    assert MARK not in str(exc)  # ... never the record's text


@pytest.mark.parametrize(("kind", "target"), CASES)
def test_bad_version_is_refused_before_training_and_changes_nothing(kind, target, ws, monkeypatch):
    folder = land_bad_version(ws, kind, target)
    monkeypatch.setattr("moecl.train.launch.launch_step", _never)
    params = load_params("params.yaml")
    registry = Registry.from_params(params)
    champion = (ws / "registry" / "champion.json").read_bytes()
    before = tree(ws)
    with pytest.raises(DataValidationError) as one:
        process_version(
            params,
            version_for(params, folder.name),
            base=NO_MODEL,
            registry=registry,
            outputs=Outputs(Path(".")),
            progress=False,
        )
    assert_names_the_defect(one.value, folder, kind)
    with pytest.raises(DataValidationError) as pending:
        run_library(params, NO_MODEL)
    assert_names_the_defect(pending.value, folder, kind)
    assert tree(ws) == before  # no bank, no registry entry, no metrics, plots or reports, data as it was
    assert (ws / "registry" / "champion.json").read_bytes() == champion
    assert task_folder_hash(ws / "registry" / "snapshots" / "topics") == registry.champion().data_version


def test_a_known_task_whose_labels_change_is_refused_before_a_bank_is_written(ws, tiny_base):
    """Valid on its own, so validation passes; the step refuses it (a task's labels are fixed once learned)
    after the drift stage, before training. Only the run's own outputs (metrics/, reports/) change."""
    from moecl.errors import MoeclError

    land(ws, make_task("topics", ["sports", "business", "weather"], seed=7), replace=True)
    params = load_params("params.yaml")
    before = tree(ws)
    with pytest.raises(MoeclError, match=r"labels changed from .* a task's labels are fixed once learned"):
        run_library(params, tiny_base)
    after = tree(ws)
    changed = {k for k in set(after) | set(before) if after.get(k) != before.get(k)}
    assert changed and all(k.split("/")[0] in ("metrics", "reports") for k in changed), changed


@pytest.mark.parametrize("bad", PATH_LIKE_IDS)
def test_task_id_check_refuses_path_like_ids(bad, tmp_path):
    assert task_id_issues(bad, "where") and task_id_issues(bad, "where")[0].field == "task_id"
    folder = write_task_folder(tmp_path, make_task("fine", ["spam", "ham"]))
    assert validate_task_folder(folder) == []
    assert [i.field for i in validate_task_folder(folder, task_id=bad)] == ["task_id"]


@pytest.mark.parametrize("bad", ["../x", "a/b", "/ABS", "x/../../y"])
def test_processing_refuses_path_like_ids_even_where_the_folder_exists(bad, ws):
    """`version_for` takes ids from event payloads and `--task`: `../x` must not reach data/x."""
    bad = bad.replace("/ABS", str(ws / "abs"))
    for name in ("x", "y", "abs"):
        write_task_folder(ws / "data" if name != "abs" else ws, make_task(name, ["spam", "ham"]))
    params = load_params("params.yaml")
    with pytest.raises(DataValidationError, match="task_id: .* is not a valid task id"):
        version_for(params, bad)


@pytest.mark.parametrize("bad", ["../x", "a/b", "/ABS", "x/../../y", ".."])
def test_import_refuses_path_like_task_ids_and_writes_nothing(bad, tmp_path, monkeypatch, capsys):
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    monkeypatch.chdir(ws)
    bad = bad.replace("/ABS", str(outside / "abs"))
    (ws / "params.yaml").write_text("data:\n  root: data/tasks\n")
    (ws / "data" / "tasks").mkdir(parents=True)
    with open(ws / "src.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"text number {i} {MARK}", "label": ["spam", "ham"][i % 2]}) + "\n")
    before = tree(tmp_path)
    capsys.readouterr()
    assert main(["data", "import", "jsonl", "src.jsonl", "--task-id", bad]) == 2
    err = capsys.readouterr().err
    assert "--task-id: task_id:" in err and "is not a valid task id" in err and MARK not in err
    assert tree(tmp_path) == before


# --- the flow (Prefect) ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flow_server():
    """A Prefect API for flow runs: the session's test harness if tests/test_flows.py already started one
    (its fixture lives for the session), else one for this module."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL

    if PREFECT_API_URL.value() and "prefect-test.db" in str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value()):
        yield
        return
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def _runs_named(client, names: list[str]) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))


def _artifacts_and_logs(run_ids: list) -> tuple[list[str], list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # the flow's logs reach the API in batches
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids))
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)))
    return [f"{a.key}\n{a.description}\n{a.data}" for a in artifacts], [log.message for log in logs]


@pytest.mark.slow
def test_flow_fails_every_bad_version_and_changes_nothing(flow_server, ws, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.self_evolve import VersionsFailed, injected_base, self_evolve

    expected = {}
    for kind, defect in DEFECTS.items():
        if defect.folder_name:
            expected[land_bad_version(ws, kind, "new-task").name] = kind
        else:
            folder = land(ws, make_task(f"bad-{kind}", ["spam", "ham"]))
            defect.mutate(folder, ["spam", "ham"])
            expected[folder.name] = kind
    expected[land_bad_version(ws, "unknown-label", "known-task").name] = "unknown-label"
    monkeypatch.setattr("moecl.train.launch.launch_step", _never)
    before = tree(ws)
    with injected_base(NO_MODEL):
        t0 = time.monotonic()
        state = self_evolve(return_state=True)
        seconds = time.monotonic() - t0
        traversal = self_evolve(task_id="../x", return_state=True)  # an event payload with a path in it
    assert state.is_failed() and traversal.is_failed()
    failed = state.result(raise_on_failure=False)
    assert isinstance(failed, VersionsFailed)
    rows = {r["task_id"]: r for r in failed.results}
    assert set(rows) == set(expected)
    for task_id, row in rows.items():
        defect = DEFECTS[expected[task_id]]
        # a folder whose name is no task id is refused when the run resolves it (moecl.evolve.version_for):
        # the run fails on that DataValidationError instead of publishing an "invalid data" summary
        prefix = (
            "Flow run encountered an exception: DataValidationError"
            if defect.folder_name
            else "invalid data:"
        )
        state = "Failed" if defect.folder_name else "Invalid data"  # flows/artifacts.py DECISION_STATES
        assert row["state"] == state and row["message"].startswith(prefix), row
        issues = [ln.strip() for ln in row["message"].splitlines()[1:]]
        where = f"{task_id}/{defect.file}" if defect.file else task_id
        assert any(where in i and (defect.field is None or f": {defect.field}: " in i) for i in issues), row
        assert MARK not in row["message"]
    with get_client(sync_client=True) as client:
        runs = _runs_named(client, [f"{t}@{r['data_version'][:10]}" for t, r in rows.items()])
    assert len(runs) == len(expected) and all(r.state.is_failed() for r in runs)
    artifacts, logs = _artifacts_and_logs([r.id for r in runs])
    summaries = [a for a in artifacts if a.startswith("moecl-summary")]
    assert len(summaries) == len(expected) - 1  # all but the folder named Bad.Task
    assert all("INVALID DATA" in a and "untouched" in a for a in summaries)
    assert not any(MARK in text for text in artifacts + logs)
    assert tree(ws) == before
    print(f"\n[timing] self_evolve over {len(expected)} bad versions: {seconds:.1f} s")


# --- 2. SIGKILL ---------------------------------------------------------------------------------------------------------
def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _wait(predicate, timeout: float, what: str, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    tails = "\n".join(f"--- {p.name}\n{_read(p)[-3000:]}" for p in logs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def _join(proc, log: Path, timeout: float = 240) -> None:
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join(10)
        raise AssertionError(f"{proc.name} did not finish in {timeout:.0f} s\n{_read(log)[-3000:]}")


def _visible_banks(root: Path) -> set[str]:
    return {p.name for p in (root / "banks").iterdir() if not p.name.startswith(".")}


def _sentiment(seed: int = 0):
    return make_task("sentiment", ["positive", "negative"], seed=seed)


@pytest.mark.slow
def test_sigkill_mid_training_leaves_no_trace_and_the_next_run_redoes_the_step(ws, tiny_base):
    from tests import faults

    params = load_params("params.yaml")
    params.train.epochs = 8  # long enough to be caught mid-training
    write_params(ws, params)
    version = task_folder_hash(land(ws, _sentiment()))
    banks, registry_before = _visible_banks(ws), registry_state(ws)
    t0 = time.monotonic()
    proc, log, _ = faults.start(ws, "none", "killed-mid-training")
    try:
        _wait(lambda: TRAINING.search(_read(log)), 120, "the first optimisation step", [log])
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
    assert (outcome.task_id, outcome.data_hash, outcome.decision) == ("sentiment", version, "promote")
    assert decisions(registry, outcome.version) == ["registered", "promoted"]
    assert registry.processed("sentiment", version).version == outcome.version == registry.champion().version
    assert run_library(params, tiny_base) == []
    print(f"\n[timing] killed {at:.1f} s after start (mid-training); rerun {time.monotonic() - t1:.1f} s")


@pytest.mark.slow
def test_sigkill_while_the_bank_is_written_leaves_only_a_hidden_temp_folder(ws, tiny_base):
    from tests import faults

    params = load_params("params.yaml")
    version = task_folder_hash(land(ws, _sentiment()))
    banks, registry_before = _visible_banks(ws), registry_state(ws)
    proc, log, _ = faults.start(ws, "kill-mid-bank-write", "killed-mid-bank-write")
    _join(proc, log)
    assert proc.exitcode == -signal.SIGKILL, _read(log)[-3000:]
    debris = [p for p in (ws / "banks").iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
    assert len(debris) == 1 and not (debris[0] / "bank.json").exists()  # the kill hit inside save_bank
    assert_consistent(ws)
    assert _visible_banks(ws) == banks and registry_state(ws) == registry_before

    (outcome,) = run_library(params, tiny_base)
    assert (outcome.data_hash, outcome.decision) == (version, "promote")
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
    folder = land(ws, _sentiment())
    version = task_folder_hash(folder)
    champion_file = ws / "registry" / "champion.json"
    old_bytes, old = champion_file.read_bytes(), json.loads(champion_file.read_text())
    proc, log, _ = faults.start(ws, fault, f"{fault}")
    _join(proc, log)
    assert proc.exitcode == -signal.SIGKILL, _read(log)[-3000:]
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


# --- 3. concurrent triggers and bursts ------------------------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_triggers_run_one_at_a_time_and_each_version_once(ws):
    """A is training `sentiment` when `spamtask` lands and two more triggers (B, C) fire at once: B and C are
    the same version, A and B/C different ones. The evolution lock serialises them; each version is decided
    once, in landing order."""
    from tests import faults

    params = load_params("params.yaml")
    params.train.epochs = 6  # A is still busy when B and C start
    write_params(ws, params)
    first = task_folder_hash(land(ws, _sentiment()))
    a, a_log, a_out = faults.start(ws, "none", "trigger-a")
    _wait(lambda: TRAINING.search(_read(a_log)), 120, "A's first optimisation step", [a_log])
    second = task_folder_hash(land(ws, make_task("spamtask", ["spam", "ham"])))
    (b, b_log, b_out), (c, c_log, c_out) = (faults.start(ws, "none", n) for n in ("trigger-b", "trigger-c"))
    for proc, log in ((a, a_log), (b, b_log), (c, c_log)):
        _join(proc, log)
        assert proc.exitcode == 0, _read(log)[-3000:]
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
    assert [(o.task_id, o.data_hash, o.decision) for o in outcomes] == [
        (n, hashes[n], "promote") for n in order
    ]
    registry = Registry.from_params(params)
    records = registry.list_versions()[1:]
    assert [(r.task_id, r.data_version) for r in records] == [(n, hashes[n]) for n in order]
    assert all(decisions(registry, r.version) == ["registered", "promoted"] for r in records)
    assert not any(replaced in (r.data_version, *r.data_hashes.values()) for r in registry.list_versions())
    from moecl.bank import read_manifest

    assert [t["task_id"] for t in read_manifest(registry.champion_bank())["tasks"]] == ["topics", *order]
    assert run_library(params, tiny_base) == []
    print(f"\n[timing] 10 versions processed in {seconds:.1f} s")


# --- 4. security ------------------------------------------------------------------------------------------------------
class _Payload:
    """A pickle that creates a folder when unpickled: proof of whether anything unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _pickle_bomb(marker: Path) -> bytes:
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload is live ...
    assert marker.is_dir()
    marker.rmdir()  # ... and disarmed until something unpickles it again
    return payload


def test_no_pickle_based_loading_in_the_code():
    """AST scan of moecl/ and flows/: no pickle-family imports, no torch.load, no unsafe yaml, no np.load with
    pickles, and every model from_pretrained asks for safetensors (or reads a GGUF file)."""
    import ast

    banned_modules = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    banned_calls = {
        "torch.load",
        "torch.jit.load",
        "yaml.load",
        "yaml.unsafe_load",
        "yaml.full_load",
        "pickle.load",
    }
    problems = []

    def dotted(node) -> str:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(node.id)
        return ".".join(reversed(parts))

    files = sorted((ROOT / "moecl").rglob("*.py")) + sorted((ROOT / "flows").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [
                    f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in banned_modules
                ]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                problems.append(f"{where}: from {node.module} import")
            elif isinstance(node, ast.Call):
                name = dotted(node.func)
                keywords = {k.arg: k.value for k in node.keywords}
                if name in banned_calls:
                    problems.append(f"{where}: {name}()")
                if name.endswith("load") and "allow_pickle" in keywords:
                    problems.append(f"{where}: {name}(allow_pickle=...)")
                if name.endswith("Model.from_pretrained") or name.endswith("ForCausalLM.from_pretrained"):
                    safe = keywords.get("use_safetensors")
                    if (
                        not (isinstance(safe, ast.Constant) and safe.value is True)
                        and "gguf_file" not in keywords
                    ):
                        problems.append(f"{where}: {name}() without use_safetensors=True")
    assert problems == []


def test_a_bank_loads_from_safetensors_and_json_only(champion_ws, tiny_base, tmp_path):
    """Stray pickles in a bank folder are never read; a manifest pointing at a pickle is refused, not run."""
    import torch

    from moecl.bank import load_bank

    registry = Registry(champion_ws / "registry", champion_ws)
    original = registry.bank_path(registry.champion())
    bank = tmp_path / "bank"
    shutil.copytree(original, bank)
    marker = tmp_path / "unpickled"
    bomb = _pickle_bomb(marker)
    for name in ("shared.pt", "expert-topics.bin", "pytorch_model.bin", "bank.pkl", "training_args.bin"):
        (bank / name).write_bytes(bomb)
    loaded, reference = load_bank(bank, tiny_base), load_bank(original, tiny_base)
    assert not marker.exists()
    a, b = loaded.model.state_dict(), reference.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from moecl.bank import file_sha256
    from moecl.integrity import seal

    manifest = json.loads((bank / "bank.json").read_text())
    manifest["tasks"][0]["file"] = "expert-topics.bin"  # a manifest sealed again after pointing at a pickle
    manifest["tasks"][0]["sha256"] = file_sha256(bank / "expert-topics.bin")
    (bank / "bank.json").write_text(json.dumps(seal(manifest)))
    with pytest.raises(Exception, match=r"(?i)header|safetensor|deserializ"):
        load_bank(bank, tiny_base)
    assert not marker.exists()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tok):
    from moecl.testing import tiny_llama

    folder = tmp_path / "tiny-model"
    tiny_llama(len(tiny_tok)).save_pretrained(folder)
    tiny_tok.save_pretrained(folder)
    return folder


def test_backbone_loads_safetensors_without_remote_code_unless_params_say_so(tiny_model_dir, monkeypatch):
    import transformers

    from moecl.config import ModelConfig
    from moecl.model.base import base_from_params

    assert Params().model.trust_remote_code is False
    assert load_params(str(ROOT / "params.yaml")).model.trust_remote_code is False
    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, _cls=cls.__name__, **kwargs):
            calls.append((_cls, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    base_from_params(ModelConfig(name_or_path=str(tiny_model_dir))).load()
    assert [c for c, _ in calls] == ["AutoModelForCausalLM", "AutoTokenizer"]
    assert all(kw["trust_remote_code"] is False for _, kw in calls)
    assert calls[0][1]["use_safetensors"] is True
    calls.clear()
    base_from_params(ModelConfig(name_or_path=str(tiny_model_dir), trust_remote_code=True)).load()
    assert all(kw["trust_remote_code"] is True for _, kw in calls)


def test_a_backbone_with_pickled_weights_only_is_refused_unread(tiny_model_dir, tmp_path):
    from moecl.backbone import BackboneError, load_backbone, pull_backbone
    from moecl.config import ModelConfig

    for weights in tiny_model_dir.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "unpickled"
    (tiny_model_dir / "pytorch_model.bin").write_bytes(_pickle_bomb(marker))
    with pytest.raises(BackboneError, match="safetensors"):
        pull_backbone(ModelConfig(name_or_path=str(tiny_model_dir)))
    with pytest.raises(BackboneError):
        load_backbone(tiny_model_dir)
    assert not marker.exists()


def test_local_prefect_server_listens_on_localhost_only(tmp_path, monkeypatch):
    from flows import server
    from moecl.cli import build_parser

    assert server.DEFAULT_HOST == "127.0.0.1" and server.api_url().startswith("http://127.0.0.1:")
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    started = []

    class FakeServer:
        pid, returncode = 4242, None

        def __init__(self, argv, **kwargs):
            started.append(argv)

        def poll(self):
            return None

    answers = iter([False, True])  # "nothing answers yet" before the start, healthy after it
    monkeypatch.setattr(server.subprocess, "Popen", FakeServer)
    monkeypatch.setattr(server, "healthy", lambda url, timeout=2.0: next(answers))
    running = server.start_server(log_path=tmp_path / "server.log")
    (argv,) = started
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "0.0.0.0" not in argv
    assert running.url == "http://127.0.0.1:4200/api"


def _with_marker(task, tag: str):
    return dataclasses.replace(
        task,
        train=[dataclasses.replace(r, text=f"{MARK}-{tag}-train {r.text}") for r in task.train],
        test=[dataclasses.replace(r, text=f"{MARK}-{tag}-test {r.text}") for r in task.test],
    )


@pytest.mark.slow
def test_no_record_text_reaches_logs_artifacts_metrics_plots_reports_or_registry(
    flow_server, ws, tiny_base, capfd, caplog
):
    """A task whose every text carries MARK goes the whole way through the flow and is promoted. MARK then
    appears only in data/ and in registry/snapshots/ (the drift reference: a copy of the data)."""
    import logging

    from flows.self_evolve import injected_base, self_evolve
    from moecl.bank import read_manifest

    caplog.set_level(logging.DEBUG)
    folder = land(ws, _with_marker(make_task("secret", ["spam", "ham"]), "flow"))
    version = task_folder_hash(folder)
    with injected_base(tiny_base):
        state = self_evolve(return_state=True)
    assert state.is_completed(), state.message
    assert [(r["task_id"], r["decision"]) for r in state.result()] == [("secret", "promote")]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        (sub,) = _runs_named(client, [f"secret@{version[:10]}"])
    artifacts, logs = _artifacts_and_logs([state.state_details.flow_run_id, sub.id])
    assert any(a.startswith("moecl-summary") for a in artifacts) and logs
    out, err = capfd.readouterr()
    leaks = [f"artifact {a[:40]!r}" for a in artifacts if MARK in a]
    leaks += [f"log line {line[:80]!r}" for line in logs if MARK in line]
    leaks += [
        name for name, text in (("stdout", out), ("stderr", err), ("caplog", caplog.text)) if MARK in text
    ]
    for path, data in tree(ws).items():
        if MARK.encode() in data and not path.startswith(("data/", "registry/snapshots/")):
            leaks.append(path)
    assert leaks == []
    assert MARK.encode() in (ws / "registry" / "snapshots" / "secret" / "train.jsonl").read_bytes()
    bank = Registry.from_params(load_params("params.yaml")).champion_bank()
    assert read_manifest(bank)["method"]["memory_per_task"] == 0
    from safetensors import safe_open

    with safe_open(str(bank / "expert-secret.safetensors"), "pt") as f:
        assert "memory.input_ids" not in f.keys()  # noqa: SIM118


def test_discriminator_memory_keeps_token_ids_of_texts_only_when_enabled(tiny_base, tiny_tok, tmp_path):
    """method.memory_per_task > 0 stores N training inputs per task as token ids in the task's expert file: not
    the text's bytes, but decodable back to it (docs/operations.md: keep it at 0 where that matters)."""
    from safetensors import safe_open

    from moecl.train.step import run_step

    params = fast_params()
    params.method.memory_per_task, params.train.max_length = 2, 128  # classifier inputs keep the text's start
    task = _with_marker(make_task("secret", ["spam", "ham"], n_train=8, n_test=4), "memory")
    run_step(params, task, base=tiny_base, out_bank=tmp_path / "bank", progress=False)
    expert = tmp_path / "bank" / "expert-secret.safetensors"
    assert MARK.encode() not in expert.read_bytes()
    with safe_open(str(expert), "pt") as f:
        rows = f.get_tensor("memory.input_ids").tolist()
    assert len(rows) == 2
    assert all(MARK in tiny_tok.decode([i for i in row if i >= 0]) for row in rows)

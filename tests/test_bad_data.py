"""Bad data, checked by injecting the fault (docs/operations.md says what happens on call): bad data versions
of every kind are refused before any training, by the library path and by the flow, and change nothing; a
path-like task id is refused wherever it comes from (a folder, an event payload, `--task`, an import).

Every workspace here uses relative paths (data/tasks, banks, registry, metrics, ...) and the test runs in it, so
"nothing else was written" is a comparison of the whole folder (moecl.testing.tree). Runs use one torch thread: on
two shared cores more threads only wait for each other.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from moecl.cli import main
from moecl.config import load_params
from moecl.data.validate import DataValidationError, task_folder_hash, task_id_issues, validate_task_folder
from moecl.evolve import Outputs, process_version, version_for
from moecl.registry import Registry
from moecl.testing import (
    MARK,
    NO_MODEL,
    TOPICS,
    artifacts_and_logs,
    flow_runs_named,
    land,
    make_task,
    no_training,
    run_library,
    tree,
    write_task_folder,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the fixtures champion_ws, ws: tests/conftest.py

PATH_LIKE_IDS = ["../x", "a/b", "..", "x/../../y", "/ABS", "Upper", "", "a" * 65]


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
    monkeypatch.setattr("moecl.train.launch.launch_step", no_training)
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
    monkeypatch.setattr("moecl.train.launch.launch_step", no_training)
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
        runs = flow_runs_named(client, [f"{t}@{r['data_version'][:10]}" for t, r in rows.items()])
    assert len(runs) == len(expected) and all(r.state.is_failed() for r in runs)
    artifacts, logs = artifacts_and_logs([r.id for r in runs])
    summaries = [a for a in artifacts if a.startswith("moecl-summary")]
    assert len(summaries) == len(expected) - 1  # all but the folder named Bad.Task
    assert all("INVALID DATA" in a and "untouched" in a for a in summaries)
    assert not any(MARK in text for text in artifacts + logs)
    assert tree(ws) == before
    print(f"\n[timing] self_evolve over {len(expected)} bad versions: {seconds:.1f} s")

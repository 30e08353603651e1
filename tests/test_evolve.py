"""The path of a dataset version through the library: promote on pass, reject on fail, idempotent reruns."""

import copy
import json

import pytest
import torch

from moecl.evolve import Outputs, evolve_pending, pending_versions, process_version, version_for
from moecl.registry import Registry
from moecl.testing import write_task_folder


@pytest.fixture
def workspace(tmp_path, fast_params, two_tasks, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = copy.deepcopy(fast_params)
    params.data.root = str(tmp_path / "data" / "tasks")
    params.registry.root = str(tmp_path / "registry")
    params.registry.banks_dir = str(tmp_path / "banks")
    params.gate.max_task_drop = 1.0  # the tiny model is noisy: these tests gate on what they construct
    params.gate.min_bwt = -1.0
    params.gate.min_canary_agreement = 0.0
    params.gate.max_confidence_ks = 1.0
    write_task_folder(tmp_path / "data" / "tasks", two_tasks[0])
    return tmp_path, params, Registry(tmp_path / "registry", tmp_path)


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_promote_then_rerun_does_nothing(workspace, tiny_base, two_tasks):
    root, params, registry = workspace
    out = evolve_pending(params, base=tiny_base, registry=registry, outputs=Outputs(root), progress=False)
    assert [o.decision for o in out] == ["promote"]
    assert registry.champion().version == out[0].version
    assert registry.champion().environment["torch"] == torch.__version__  # the record says what trained it
    gate = json.loads((root / "metrics" / "gate.json").read_text())
    assert gate["decision"] == "promote"
    assert (root / "metrics" / "cl.json").is_file() and (root / "plots").is_dir()
    assert (root / "reports" / "drift-topics.html").is_file()

    assert pending_versions(params, registry) == []
    assert (
        evolve_pending(params, base=tiny_base, registry=registry, outputs=Outputs(root), progress=False) == []
    )

    write_task_folder(root / "data" / "tasks", two_tasks[1])
    second = evolve_pending(params, base=tiny_base, registry=registry, outputs=Outputs(root), progress=False)
    assert [o.task_id for o in second] == ["sentiment"]
    cl = json.loads((root / "metrics" / "cl.json").read_text())
    assert cl["order"] == ["topics", "sentiment"] and len(cl["matrix"]) == 2
    again = process_version(
        params,
        version_for(params, "sentiment"),
        base=tiny_base,
        registry=registry,
        outputs=Outputs(root),
        progress=False,
    )
    assert again.decision == "skipped"


def test_forgetting_challenger_is_rejected_and_champion_kept(workspace, tiny_base, two_tasks):
    root, params, registry = workspace
    evolve_pending(params, base=tiny_base, registry=registry, outputs=Outputs(root), progress=False)
    champion = registry.champion()
    champion_file = (root / "registry" / "champion.json").read_bytes()
    write_task_folder(root / "data" / "tasks", two_tasks[1])
    strict = copy.deepcopy(params)
    strict.gate.max_task_drop = -0.5  # any challenger "forgets" against this threshold
    out = process_version(
        strict,
        version_for(strict, "sentiment"),
        base=tiny_base,
        registry=registry,
        outputs=Outputs(root),
        progress=False,
    )
    assert out.decision == "reject"
    assert any(r.startswith("forgetting") and "topics" in r for r in out.reasons)
    assert registry.champion().version == champion.version
    assert (root / "registry" / "champion.json").read_bytes() == champion_file
    assert registry.get(out.version).status == "rejected"
    assert json.loads((root / "metrics" / "gate.json").read_text())["decision"] == "reject"


def test_drifted_new_version_of_a_known_task_is_rejected(workspace, tiny_base):
    from moecl.testing import make_task

    root, params, registry = workspace
    evolve_pending(params, base=tiny_base, registry=registry, outputs=Outputs(root), progress=False)
    drifted = make_task("topics", ["sports", "business", "science"], n_train=30, seed=5)
    drifted.train = [
        type(r)(" ".join(["zebra quantum"] * 40) + f" {i}", "sports") if i % 2 else r
        for i, r in enumerate(drifted.train)
    ]
    import shutil

    shutil.rmtree(root / "data" / "tasks" / "topics")
    write_task_folder(root / "data" / "tasks", drifted)
    out = process_version(
        params,
        version_for(params, "topics"),
        base=tiny_base,
        registry=registry,
        outputs=Outputs(root),
        progress=False,
    )
    assert out.decision == "reject"
    assert any(r.startswith("data_drift") for r in out.reasons), out.reasons


def test_invalid_version_is_refused_before_anything_is_written(workspace, tiny_base):
    from moecl.data.validate import DataValidationError

    root, params, registry = workspace
    evolve_pending(params, base=tiny_base, registry=registry, outputs=Outputs(root), progress=False)
    bad = root / "data" / "tasks" / "broken"
    bad.mkdir()
    (bad / "task.yaml").write_text("labels: [a, b]\n")
    (bad / "train.jsonl").write_text('{"text": "x", "label": "a"}\n{"text": "y"}\n')
    (bad / "test.jsonl").write_text('{"text": "z", "label": "b"}\n')
    before = {k: v for k, v in _tree(root).items() if not k.startswith("data/")}
    with pytest.raises(DataValidationError, match=r"train.jsonl:2: label"):
        process_version(
            params,
            version_for(params, "broken"),
            base=tiny_base,
            registry=registry,
            outputs=Outputs(root),
            progress=False,
        )
    after = {k: v for k, v in _tree(root).items() if not k.startswith("data/")}
    assert after == before


def test_an_invalid_version_does_not_hold_up_the_ones_behind_it(workspace, tiny_base, two_tasks):
    import os

    from moecl.evolve import InvalidVersions

    root, params, registry = workspace
    bad = root / "data" / "tasks" / "broken"
    bad.mkdir()
    (bad / "task.yaml").write_text("labels: [a, b]\n")
    (bad / "train.jsonl").write_text('{"text": "x", "label": "a"}\n{"text": "y"}\n')
    (bad / "test.jsonl").write_text('{"text": "z", "label": "b"}\n')
    for path in bad.iterdir():  # it landed first
        os.utime(path, (1, 1))
    with pytest.raises(
        InvalidVersions, match=r"(?s)1 dataset version.*broken@.*train.jsonl:2: label"
    ) as caught:
        evolve_pending(params, base=tiny_base, registry=registry, outputs=Outputs(root), progress=False)
    assert [o.task_id for o in caught.value.outcomes] == ["topics"]
    assert [o.decision for o in caught.value.outcomes] == ["promote"]
    assert registry.champion().version == caught.value.outcomes[0].version
    assert [p.task_id for p in pending_versions(params, registry)] == ["broken"]  # still pending, fix it


def test_a_broken_known_task_is_evaluated_on_its_last_promoted_version(workspace, tiny_base, two_tasks):
    from moecl.evolve import InvalidVersions

    root, params, registry = workspace
    evolve_pending(params, base=tiny_base, registry=registry, outputs=Outputs(root), progress=False)
    topics = root / "data" / "tasks" / "topics"
    with (topics / "train.jsonl").open("a") as f:
        f.write('{"text": "no label here"}\n')
    write_task_folder(root / "data" / "tasks", two_tasks[1])
    with pytest.raises(InvalidVersions, match=r"topics@") as caught:
        evolve_pending(params, base=tiny_base, registry=registry, outputs=Outputs(root), progress=False)
    (outcome,) = caught.value.outcomes
    assert outcome.task_id == "sentiment" and outcome.decision == "promote"
    assert set(outcome.metrics["per_task"]) == {"topics", "sentiment"}
    assert [p.task_id for p in pending_versions(params, registry)] == ["topics"]

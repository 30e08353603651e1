"""`dvc repro` end to end on a tiny local model: metrics, plots, gate; a second repro is a no-op."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moecl.testing import write_task_folder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(cmd, cwd, env, check=True):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture
def dvc_project(tmp_path, tiny_tok, two_tasks):
    import yaml

    from moecl.testing import tiny_llama

    project = tmp_path / "project"
    project.mkdir()
    model_dir = tmp_path / "tiny-model"
    tiny_llama(len(tiny_tok)).save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["name_or_path"] = str(model_dir)
    params["train"].update({"epochs": 2, "lr": 0.005, "max_length": 64, "evals_per_epoch": 1})
    params["gate"].update(
        {"max_task_drop": 1.0, "min_bwt": -1.0, "min_canary_agreement": 0.0, "max_confidence_ks": 1.0}
    )
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    run(["git", "init", "-q"], project, env)
    run(["dvc", "init", "-q"], project, env)
    shutil.copytree(REPO / ".dvc" / "plots", project / ".dvc" / "plots")
    write_task_folder(project / "data" / "tasks", two_tasks[0])
    run(["dvc", "add", "-q", "data"], project, env)
    return project, env


def yaml_lr(project):
    import yaml

    return yaml.safe_load((project / "params.yaml").read_text())["train"]["lr"]


def test_repro_end_to_end_then_noop_then_next_task(dvc_project, two_tasks):
    project, env = dvc_project
    run(["dvc", "repro"], project, env)
    cl = json.loads((project / "metrics/cl.json").read_text())
    gate = json.loads((project / "metrics/gate.json").read_text())
    assert cl["order"] == ["topics"] and len(cl["matrix"]) == 1
    assert gate["decision"] == "promote" and gate["checks"]
    for name in ("accuracy_matrix", "task_accuracy", "forgetting"):
        assert (project / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (project / "reports/drift.html").is_file()

    again = run(["dvc", "repro"], project, env)
    assert "Running stage 'train'" not in again.stdout, again.stdout
    assert "Running stage 'evaluate'" not in again.stdout
    status = run(["dvc", "status", "--json"], project, env)
    # only the registry read-back stage is always re-run; everything downstream is up to date
    assert json.loads(status.stdout or "{}") == {"champion": ["always changed"]}

    # experiments compare with DVC's own tools
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-q", "-m", "baseline"], project, env)
    run(["dvc", "exp", "run", "--temp", "-S", "train.lr=0.002"], project, env)
    exps = json.loads(run(["dvc", "exp", "show", "--json"], project, env).stdout)
    assert "0.002" in json.dumps(exps)
    assert yaml_lr(project) == 0.005  # --temp leaves the working copy's params alone

    run([sys.executable, "-m", "moecl.stages", "promote"], project, env)
    write_task_folder(project / "data" / "tasks", two_tasks[1])
    run(["dvc", "add", "-q", "data"], project, env)
    run(["dvc", "repro"], project, env)
    cl = json.loads((project / "metrics/cl.json").read_text())
    assert cl["order"] == ["topics", "sentiment"] and len(cl["matrix"]) == 2
    shown = run(["dvc", "metrics", "show", "--json"], project, env)
    assert "acc" in shown.stdout


def test_gate_and_promote_read_the_evaluate_stages_metrics_only_when_they_are_the_challengers(
    tmp_path, monkeypatch
):
    """The gate and promote stages take metrics/cl.json instead of evaluating the bank again; a cl.json of
    another challenger (other tasks, another newest task) or none at all is refused, naming the file."""
    from moecl.errors import MoeclError
    from moecl.io import write_json_atomic
    from moecl.metrics import ContinualMetrics
    from moecl.stages import _challenger_metrics

    monkeypatch.chdir(tmp_path)
    challenger = (["news", "spam"], "spam")  # its tasks, its newest task
    with pytest.raises(MoeclError, match="cl.json is missing"):
        _challenger_metrics(*challenger)
    metrics = ContinualMetrics(
        order=["news", "spam"],
        matrix=[{"news": 0.8}, {"news": 0.75, "spam": 0.9}],
        before_training={"spam": 0.5},
        zero_shot={"news": 0.25, "spam": 0.5},
    )
    write_json_atomic(Path("metrics/cl.json"), metrics.as_dict())
    assert _challenger_metrics(*challenger).as_dict() == metrics.as_dict()

    for other in ((["news", "spam"], "news"), (["news", "spam", "faq"], "spam")):
        with pytest.raises(MoeclError, match="does not belong to pipeline/challenger"):
            _challenger_metrics(*other)

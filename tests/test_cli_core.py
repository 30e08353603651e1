"""The core commands end to end on a tiny local model: step on two tasks, eval, predict, and bad inputs."""

import filecmp
import json

import pytest

from moecl.cli import main


def write_task_folder(root, task):
    import yaml

    folder = root / task.task_id
    folder.mkdir(parents=True)
    (folder / "task.yaml").write_text(
        yaml.safe_dump({"labels": task.labels, "instruction": task.instruction, "description": "synthetic"})
    )
    for split in ("train", "test"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for r in getattr(task, split):
                f.write(json.dumps({"text": r.text, "label": r.label}) + "\n")
    return folder


@pytest.fixture
def project(tmp_path, tiny_tok, two_tasks, monkeypatch):
    from moecl.testing import tiny_llama

    model_dir = tmp_path / "tiny-model"
    tiny_llama(len(tiny_tok)).save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    for task in two_tasks:
        write_task_folder(tmp_path / "data" / "tasks", task)
    (tmp_path / "params.yaml").write_text(
        f"model:\n  name_or_path: {model_dir}\n"
        "train:\n  epochs: 2\n  lr: 0.005\n  max_length: 64\n  evals_per_epoch: 1\n"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_step_two_tasks_then_eval_gives_a_2x2_matrix(project, capsys):
    assert main(["step", "--task", "topics", "--out", "banks/b1", "--quiet"]) == 0
    assert main(["step", "--task", "sentiment", "--bank", "banks/b1", "--out", "banks/b2", "--quiet"]) == 0
    assert filecmp.cmp(
        project / "banks/b1/expert-topics.safetensors",
        project / "banks/b2/expert-topics.safetensors",
        shallow=False,
    )
    capsys.readouterr()
    assert main(["eval", "--bank", "banks/b2", "--json", "--quiet", "--out", "metrics/cl.json"]) == 0
    record = json.loads(capsys.readouterr().out)
    matrix = record["metrics"]["matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert matrix[0][1] is None  # task 2 was not learned after step 1
    for key in ("acc", "bwt", "fwt"):
        assert isinstance(record["metrics"][key], float)
    assert json.loads((project / "metrics/cl.json").read_text())["order"] == ["topics", "sentiment"]

    assert main(["predict", "--bank", "banks/b2", "--task", "sentiment", "great lovely", "awful refund"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and all(x["label"] in ("positive", "negative") for x in lines)
    assert set(lines[0]["scores"]) == {"positive", "negative"}


def test_bad_inputs_give_clear_errors_and_write_nothing(project, capsys):
    assert main(["step", "--task", "topics", "--out", "banks/b1", "--quiet"]) == 0
    other = project / "other-model"
    from moecl.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_llama(len(tok), seed=7).save_pretrained(other)
    tok.save_pretrained(other)

    def snapshot():  # the model folders may gain a recorded weights hash (a cache); nothing else may change
        return sorted(str(p) for p in project.rglob("*") if "-model" not in str(p))

    before = snapshot()
    capsys.readouterr()

    assert main(["predict", "--bank", "banks/b1", "--task", "nope", "hi"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err

    assert (
        main(["-S", "train.lrr=1", "step", "--task", "sentiment", "--bank", "banks/b1", "--out", "banks/x"])
        == 2
    )
    assert "train.lrr is not a known key" in capsys.readouterr().err

    assert main(["step", "--task", "missing", "--bank", "banks/b1", "--out", "banks/x"]) == 2
    assert "no task folder" in capsys.readouterr().err

    assert main(["-S", f"model.name_or_path={other}", "eval", "--bank", "banks/b1"]) == 2
    assert "built on base model" in capsys.readouterr().err
    assert snapshot() == before

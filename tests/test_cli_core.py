"""The core commands end to end on a tiny local model: step on two tasks, eval, predict, and bad inputs."""

import filecmp
import json

import pytest

from moecl.cli import main
from moecl.testing import write_task_folder


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

    # --routing: the gate's weight on each task's own expert; the default gate starts leaning to it (gate_bias)
    assert main(["eval", "--bank", "banks/b2", "--json", "--routing", "--quiet"]) == 0
    routing = json.loads(capsys.readouterr().out)["routing"]
    assert set(routing) == {"topics", "sentiment"}
    for cell in routing.values():
        assert 0.5 < cell["min"] <= cell["mean"] <= cell["max"] < 1.0
    assert main(["eval", "--bank", "banks/b2", "--routing", "--quiet"]) == 0
    assert "gate weight on each task's own expert" in capsys.readouterr().out


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


# --- the hand-driven line: `moecl step` continues it, `moecl eval` / `moecl predict` find it -------------------
def _step(capsys, *argv):
    assert main(["step", *argv, "--quiet"]) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def test_two_steps_without_flags_continue_one_line_and_eval_and_predict_find_it(project, capsys):
    """No --bank, no champion: the first step starts a bank, the second continues it (the first task's expert
    byte-identical in both), `moecl eval` and `moecl predict` take that newest bank and say so; --new starts
    afresh."""
    capsys.readouterr()
    first, err = _step(capsys, "--task", "topics")
    assert first["parent"] is None and "starting a new bank" in err
    second, err = _step(capsys, "--task", "sentiment")
    assert second["parent"] == first["bank"] and second["bank"] != first["bank"]
    assert f"continuing from {first['bank']}, the newest bank `moecl step` wrote" in err
    assert filecmp.cmp(
        project / first["bank"] / "expert-topics.safetensors",
        project / second["bank"] / "expert-topics.safetensors",
        shallow=False,
    )

    assert main(["eval", "--json", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["metrics"]["order"] == ["topics", "sentiment"]
    assert f"eval: {second['bank']}, the newest bank `moecl step` wrote (no champion" in err

    assert main(["predict", "--task", "topics", "match goal team"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["label"] in ("sports", "business", "science")
    assert f"predict: {second['bank']}" in err

    fresh, err = _step(capsys, "--task", "sentiment", "--new")
    assert fresh["parent"] is None and "starting a new bank (--new)" in err
    from moecl.bank import read_manifest

    assert read_manifest(project / fresh["bank"]).task_ids == ["sentiment"]
    with pytest.raises(SystemExit):  # one or the other
        main(["step", "--task", "topics", "--new", "--bank", first["bank"]])
    assert "not allowed with" in capsys.readouterr().err


def test_the_champion_comes_first_for_eval_and_after_the_step_line_for_step(project, capsys):
    from moecl.config import load_params
    from moecl.registry import Registry
    from moecl.step_line import last_step_path

    params = load_params("params.yaml")
    capsys.readouterr()
    first, _ = _step(capsys, "--task", "topics", "--out", "banks/b1")
    registry = Registry.from_params(params)
    registry.promote(registry.register("banks/b1", task_id="topics").version)
    last_step_path(params).unlink()  # a workspace whose champion came from the flow: no `moecl step` yet

    second, err = _step(capsys, "--task", "sentiment")
    assert second["parent"] == str(project / "banks/b1")
    assert f"continuing from the champion v0001 ({project / 'banks/b1'})" in err

    assert main(["eval", "--json", "--quiet"]) == 0  # the champion, not the newer step bank
    out, err = capsys.readouterr()
    assert json.loads(out)["metrics"]["order"] == ["topics"]
    assert "eval: the champion v0001" in err and f"the newest `moecl step` bank is {second['bank']}" in err

    # the champion does not know sentiment; the newest step bank does: predict takes it, and says why
    assert main(["predict", "--task", "sentiment", "great lovely"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["label"] in ("positive", "negative")
    assert "the champion v0001 does not know task 'sentiment'" in err

    third, err = _step(
        capsys, "--task", "topics"
    )  # the line continues from the step's bank, not the champion
    assert third["parent"] == second["bank"]


def test_without_a_bank_to_use_the_errors_name_a_next_step_that_works(project, capsys):
    capsys.readouterr()
    assert main(["eval"]) == 2
    err = capsys.readouterr().err
    assert "no champion" in err and "`moecl step --task sentiment`" in err and "--bank DIR" in err

    (project / "banks").mkdir()
    (project / "banks" / "last-step.json").write_text('{"bank": "banks/gone"}')
    for argv in (["eval"], ["step", "--task", "topics"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "banks/gone (recorded in banks/last-step.json), is missing" in err and "--bank DIR" in err
    assert "--new" in err
    (project / "banks" / "last-step.json").write_text("{not json")
    assert main(["eval"]) == 2
    assert "banks/last-step.json: cannot read" in capsys.readouterr().err


# --- --params and -S before or after the command ---------------------------------------------------------------
def test_params_and_set_are_accepted_before_and_after_the_command(project, capsys, two_tasks):
    from moecl.cli import build_parser

    args = build_parser().parse_args(
        ["-S", "a.b=1", "--params", "p1.yaml", "data", "-S", "c.d=2", "validate", "-S", "e.f=3"]
    )
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"] and args.params == "p1.yaml"
    assert build_parser().parse_args(["step", "--task", "t", "--params", "p2.yaml"]).params == "p2.yaml"
    assert build_parser().parse_args(["eval"]).params == "params.yaml"

    write_task_folder(project / "other", two_tasks[0])
    capsys.readouterr()
    assert main(["data", "validate", "-S", "data.root=other", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["other/topics"]
    # before and after together: both apply (the root from before, the record cap from after)
    assert main(["-S", "data.root=other", "data", "validate", "-S", "data.max_records=3"]) == 1
    assert "other/topics/train.jsonl" in capsys.readouterr().out
    (project / "other.yaml").write_text("data:\n  root: other\n")
    assert main(["data", "validate", "--params", "other.yaml", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["other/topics"]

    assert main(["step", "--task", "topics", "-S", "train.lrr=1"]) == 2
    assert "train.lrr is not a known key" in capsys.readouterr().err
    assert not (project / "banks").exists()

import json

import pytest
import torch

from moecl.bank import load_bank, read_manifest
from moecl.errors import BankError, UnknownTaskError
from moecl.integrity import MANIFEST
from moecl.manifest import BaseModelRef
from moecl.model.base import BaseSpec
from moecl.model.inference import predict
from moecl.train.step import run_step


@pytest.fixture
def bank_one(tiny_base, fast_params, two_tasks, tmp_path):
    run_step(fast_params, two_tasks[0], base=tiny_base, out_bank=tmp_path / "b1", progress=False)
    return tmp_path / "b1"


def test_round_trip_is_exact(bank_one, tiny_base, tiny_tok, fast_params, two_tasks, tmp_path):
    first = load_bank(bank_one, tiny_base)
    second = load_bank(bank_one, tiny_base)
    a = dict(first.model.named_parameters())
    for name, p in second.model.named_parameters():
        assert torch.equal(p, a[name]), name
    texts = [r.text for r in two_tasks[0].test[:5]]
    p1 = predict(first.model, tiny_tok, "topics", texts)
    p2 = predict(second.model, tiny_tok, "topics", texts)
    assert [x.scores for x in p1] == [x.scores for x in p2]


def test_manifest_records_lineage_and_hashes(bank_one, tiny_base, two_tasks):
    manifest = read_manifest(bank_one)
    assert manifest.base_model == BaseModelRef("tiny-llama", tiny_base.sha256)
    assert manifest.tasks[0].task_id == "topics"
    assert manifest.tasks[0].labels == ["sports", "business", "science"]
    assert manifest.tasks[0].content_hash == two_tasks[0].content_hash()
    assert manifest.lineage.content_hash == two_tasks[0].content_hash()
    assert manifest.lineage.params["train"]["lr"] == pytest.approx(5e-3)
    environment = manifest.lineage.environment  # what trained it: the machine and the library versions
    assert environment["torch"] == torch.__version__ and environment["cpu_count"] and environment["peft"]
    assert manifest.steps == ["topics"]
    assert sorted(p.name for p in bank_one.iterdir()) == [
        "bank.json",
        "expert-topics.safetensors",
        "shared.safetensors",
    ]
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in bank_one.iterdir())


def test_loading_on_another_base_model_fails_clearly(bank_one, tiny_base):
    other = BaseSpec("other-model", "0" * 64, tiny_base.load)
    with pytest.raises(BankError, match="built on base model 'tiny-llama'"):
        load_bank(bank_one, other)


def test_banks_are_immutable(bank_one, tiny_base, fast_params, two_tasks):
    before = {p.name: p.read_bytes() for p in bank_one.iterdir()}
    with pytest.raises(BankError, match="immutable"):
        run_step(
            fast_params, two_tasks[1], base=tiny_base, parent_bank=bank_one, out_bank=bank_one, progress=False
        )
    assert {p.name: p.read_bytes() for p in bank_one.iterdir()} == before


def test_failed_step_leaves_no_half_bank(bank_one, tiny_base, fast_params, two_tasks, tmp_path, monkeypatch):
    import moecl.bank as bank_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bank_mod, "_save_tensors", boom)
    with pytest.raises(RuntimeError):
        run_step(
            fast_params,
            two_tasks[1],
            base=tiny_base,
            parent_bank=bank_one,
            out_bank=tmp_path / "b2",
            progress=False,
        )
    assert not (tmp_path / "b2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b2")]


def test_unknown_task_at_predict(bank_one, tiny_base, tiny_tok):
    loaded = load_bank(bank_one, tiny_base)
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'.*topics"):
        predict(loaded.model, tiny_tok, "nope", ["hello"])


def test_method_change_on_an_existing_bank_is_refused(bank_one, tiny_base, fast_params, two_tasks, tmp_path):
    from moecl.errors import MoeclError

    fast_params.method.name = "per_task_lora"
    with pytest.raises(MoeclError, match="method.name"):
        run_step(
            fast_params,
            two_tasks[1],
            base=tiny_base,
            parent_bank=bank_one,
            out_bank=tmp_path / "b2",
            progress=False,
        )
    assert not (tmp_path / "b2").exists()


def test_evaluation_record(bank_one, tiny_base, fast_params, two_tasks):
    from moecl.evaluate import evaluate_bank

    evaluation = evaluate_bank(bank_one, tiny_base, {"topics": two_tasks[0]}, fast_params, progress=False)
    assert len(evaluation.metrics.matrix) == 1
    assert json.loads((bank_one / "evaluation.json").read_text()) == evaluation.record
    assert evaluation.metrics.as_dict() == evaluation.record["metrics"]


def test_the_manifest_records_the_steps_training(tiny_base, fast_params, two_tasks, tmp_path):
    """The bank's `train` section: the step's dev curve, the checkpoint kept on it, its last losses and sizes."""
    result = run_step(fast_params, two_tasks[0], base=tiny_base, out_bank=tmp_path / "b1", progress=False)
    train, outcome = read_manifest(tmp_path / "b1").train, result.outcome
    assert train["optimisation_steps"] == len(outcome.losses) > 0
    assert train["train_examples"] == outcome.train_examples > 0
    assert train["dev_examples"] == outcome.dev_examples > 0
    curve = dict(train["dev_accuracy"])
    assert len(curve) == fast_params.train.epochs  # one dev evaluation an epoch
    assert curve[train["best_step"]] == train["best_dev_accuracy"] == max(curve.values())
    assert train["final_losses"]["task"] == pytest.approx(outcome.losses[-1].task, abs=1e-6)

    fast_params.train.dev_fraction = 0.0  # no dev split: no curve, and no NaN written into the manifest
    run_step(fast_params, two_tasks[0], base=tiny_base, out_bank=tmp_path / "b2", progress=False)
    text = (tmp_path / "b2" / MANIFEST).read_text()
    train = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the manifest"))["train"]
    assert train["dev_accuracy"] == [] and train["best_dev_accuracy"] is None
    assert train["best_step"] == train["optimisation_steps"]  # no dev: the last step's weights are kept

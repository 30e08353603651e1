"""bench.probes: how far apart two banks are (parameters, outputs), and where the gate routes each task."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from moecl.testing import paper_method


@pytest.fixture(scope="module")
def banks(tmp_path_factory, tiny_base, two_tasks):
    """Two one-task banks that differ only in their seed, and the params they were trained with."""
    from moecl.config import Params
    from moecl.train.step import run_step

    params = Params()
    params.method = paper_method(mode="instruction")  # one gate per layer: a "gate" parameter group
    params.train.epochs, params.train.lr, params.train.max_length = 2, 5e-3, 64
    params.evaluate.max_new_tokens = 3
    root = tmp_path_factory.mktemp("agreement")
    for seed in (1, 2):
        p = copy.deepcopy(params)
        p.train.seed = seed
        run_step(p, two_tasks[0], base=tiny_base, out_bank=root / f"seed{seed}", progress=False)
    return root / "seed1", root / "seed2", params


def test_parameter_distance_is_zero_to_itself_and_positive_between_seeds(banks):
    from bench.probes import parameter_groups, relative_distance

    a, b, _ = banks
    groups_a, groups_b = parameter_groups(a), parameter_groups(b)
    assert {"shared", "gate", "expert topics"} <= set(groups_a)
    for group in ("shared", "gate", "expert topics"):
        assert relative_distance(groups_a[group], groups_a[group]) == 0.0
        assert relative_distance(groups_a[group], groups_b[group]) > 0.0


def test_lora_pairs_are_compared_as_their_weight_change():
    from bench.probes import relative_distance

    a = {"x.A": torch.ones(2, 3), "x.B": torch.ones(4, 2)}
    # B @ A is the same although A and B are not: (2B)(A/2) = BA
    b = {"x.A": torch.ones(2, 3) / 2, "x.B": torch.ones(4, 2) * 2}
    assert relative_distance(a, b) == pytest.approx(0.0)
    assert relative_distance(a, {"x.A": torch.ones(2, 3), "x.B": torch.zeros(4, 2)}) == pytest.approx(1.0)


def test_weight_norm_measures_the_change_a_lora_pair_makes():
    from bench.probes import weight_norm

    # B @ A is a 4 x 3 matrix of 2s: norm sqrt(12 * 4); scaling A up and B down leaves it unchanged
    assert weight_norm({"x.A": torch.ones(2, 3), "x.B": torch.ones(4, 2)}) == pytest.approx(math.sqrt(48))
    assert weight_norm({"x.A": torch.ones(2, 3) * 4, "x.B": torch.ones(4, 2) / 4}) == pytest.approx(
        math.sqrt(48)
    )
    assert weight_norm({"x.A": torch.ones(2, 3), "x.B": torch.zeros(4, 2)}) == 0.0  # B = 0: no change yet


def test_outputs_of_a_bank_agree_with_themselves(banks, tiny_base, two_tasks):
    from bench.probes import output_agreement, total_variation
    from moecl.bank import load_bank

    a, b, params = banks
    records = two_tasks[0].test[:8]
    same = output_agreement(load_bank(a, tiny_base), load_bank(a, tiny_base), "topics", records, params)
    assert same == {"records": 8, "answers_differ": 0, "mean_tv_distance": 0.0, "max_tv_distance": 0.0}
    other = output_agreement(load_bank(a, tiny_base), load_bank(b, tiny_base), "topics", records, params)
    assert other["records"] == 8 and other["mean_tv_distance"] > 0.0
    assert total_variation({"x": 0.75, "y": 0.25}, {"x": 0.25, "y": 0.75}) == pytest.approx(0.5)


def test_routing_probe_reads_the_gate_weight_of_the_dedicated_expert(banks, tiny_base, two_tasks):
    from bench.probes import dedicated_share
    from moecl.bank import load_bank

    a, _, params = banks
    loaded = load_bank(a, tiny_base)
    texts = [r.text for r in two_tasks[0].test[:6]]
    share = dedicated_share(loaded.model, loaded.tokenizer, "topics", texts, params.train.max_length)
    assert len(share) == len(loaded.model.layers)
    # zero gate weights give equal logits: beta_t is exactly one half on every layer and token
    with torch.no_grad():
        for layer in loaded.model.layers:
            layer.gate.weight.zero_()
    routed = dedicated_share(loaded.model, loaded.tokenizer, "topics", texts, params.train.max_length)
    assert routed == pytest.approx([0.5] * len(share), abs=1e-6)


def test_routing_probe_refuses_a_bank_without_gates(tiny_base, two_tasks, tmp_path):
    from bench.probes import dedicated_share
    from moecl.bank import load_bank
    from moecl.config import Params
    from moecl.train.step import run_step

    params = Params()
    params.method.name = "seq_lora"
    params.train.epochs, params.train.max_length = 1, 48
    run_step(params, two_tasks[0], base=tiny_base, out_bank=tmp_path / "seq", progress=False)
    loaded = load_bank(tmp_path / "seq", tiny_base)
    with pytest.raises(ValueError, match="no gates"):
        dedicated_share(loaded.model, loaded.tokenizer, "topics", ["a text"], 48)


def test_routing_probe_reads_each_tasks_own_gate(tiny_base, tiny_tok):
    """With method.task_gates the probe reads the task's own gate: a bias of b gives beta_t = sigmoid(b) when
    the gate's weights are zero."""
    from bench.probes import dedicated_share
    from moecl.config import MethodConfig, Params
    from moecl.model.moecl_model import MoECLModel, TaskInfo, expert_name

    model = MoECLModel(
        tiny_base.load()[0], Params().lora, MethodConfig(name="moecl", task_gates=True, gate_bias=1.0)
    )
    model.add_task(TaskInfo("t1", ["a", "b"]))
    model.add_task(TaskInfo("t2", ["a", "b"]))
    with torch.no_grad():
        for layer in model.layers:
            for gate in layer.task_gates.values():
                gate.weight.zero_()
            layer.task_gates[expert_name("t2")].bias.copy_(torch.tensor([0.0, -1.0]))
    share_1 = dedicated_share(model, tiny_tok, "t1", ["alpha beta", "gamma"], 32)
    share_2 = dedicated_share(model, tiny_tok, "t2", ["alpha beta", "gamma"], 32)
    assert share_1 == pytest.approx([float(torch.sigmoid(torch.tensor(1.0)))] * len(model.layers), abs=1e-6)
    assert share_2 == pytest.approx([float(torch.sigmoid(torch.tensor(-1.0)))] * len(model.layers), abs=1e-6)


def test_the_agreement_command_compares_parameters(banks, capsys):
    from bench.probes import main

    a, b, _ = banks
    assert main(["agreement", str(a), str(b), "--parameters-only"]) == 0
    out = capsys.readouterr().out
    assert "expert topics" in out and "distance" in out
    with pytest.raises(SystemExit):  # agreement compares exactly two banks
        main(["agreement", str(a)])

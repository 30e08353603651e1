"""moecl.routing: where the gate routes each task (the weight beta_t on its own expert)."""

from __future__ import annotations

import pytest
import torch

from moecl.testing import paper_method


def test_routing_probe_reads_the_gate_weight_of_the_dedicated_expert(tiny_base, two_tasks, tmp_path):
    from moecl.bank import load_bank
    from moecl.config import Params
    from moecl.routing import dedicated_share
    from moecl.train.step import run_step

    params = Params()
    params.method = paper_method(mode="instruction")  # one gate per layer
    params.train.epochs, params.train.lr, params.train.max_length = 2, 5e-3, 64
    run_step(params, two_tasks[0], base=tiny_base, out_bank=tmp_path / "bank", progress=False)
    loaded = load_bank(tmp_path / "bank", tiny_base)
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
    from moecl.bank import load_bank
    from moecl.config import Params
    from moecl.routing import dedicated_share
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
    from moecl.config import MethodConfig, Params
    from moecl.model.moecl_model import MoECLModel, TaskInfo, expert_name
    from moecl.routing import dedicated_share

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


def test_routing_probe_ignores_padding(tiny_base, tiny_tok):
    """A batch of prompts of different lengths gives the token-weighted mean of each prompt alone: the padded
    positions of the shorter prompt count for nothing."""
    from moecl.config import MethodConfig, Params
    from moecl.model.encoding import Encoder
    from moecl.model.moecl_model import MoECLModel, TaskInfo
    from moecl.routing import dedicated_share

    torch.manual_seed(0)
    model = MoECLModel(tiny_base.load()[0], Params().lora, MethodConfig(name="moecl", task_gates=True))
    model.add_task(TaskInfo("t1", ["a", "b"]))
    with torch.no_grad():
        for layer in model.layers:
            for gate in layer.task_gates.values():
                gate.weight.normal_(
                    std=1.0
                )  # a gate that reads the tokens: beta_t differs from token to token
    texts = ["alpha", "beta gamma delta alpha beta gamma delta"]
    alone = [dedicated_share(model, tiny_tok, "t1", [t], 32) for t in texts]
    encoder = Encoder(tiny_tok, "t1", ["a", "b"], model.task("t1").instruction, model.mode, 32)
    tokens = [len(encoder.encode(t).input_ids) for t in texts]
    assert tokens[0] != tokens[1] and alone[0] != pytest.approx(alone[1])
    expected = [(a * tokens[0] + b * tokens[1]) / sum(tokens) for a, b in zip(*alone)]
    assert dedicated_share(model, tiny_tok, "t1", texts, 32) == pytest.approx(expected, abs=1e-6)

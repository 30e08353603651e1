"""The method knobs beyond the paper: what a step with each one changes, and what it leaves alone."""

import copy
import dataclasses

import pytest
import torch

from moecl.config import PAPER_SETTING, MethodConfig, Params, ParamsError, apply_overrides
from moecl.model.encoding import Encoder, collate, pad_id
from moecl.model.moecl_model import SHARED, MoECLModel, TaskInfo, expert_name, shared_chunk_name
from moecl.testing import paper_method


def _two_steps(tiny_base, params, two_tasks, tmp_path):
    """Task 1 as a bank (b1), then task 2 trained from it IN MEMORY: (b1's model, the model after the second
    step as it sits in memory). Checked in memory, not through the saved bank, whose files of untrained tasks
    are links to the parent's and so could not show a frozen part that moved."""
    from moecl.bank import load_bank
    from moecl.train.loop import train_on_task
    from moecl.train.step import run_step

    t1, t2 = two_tasks
    run_step(params, t1, base=tiny_base, out_bank=tmp_path / "b1", progress=False)
    before = load_bank(tmp_path / "b1", tiny_base).model
    loaded = load_bank(tmp_path / "b1", tiny_base)
    model = loaded.model
    model.add_task(TaskInfo(t2.task_id, list(t2.labels), t2.instruction))
    train_on_task(model, loaded.tokenizer, t2, params, progress=False)
    return before, model


def _changed(before: dict, after: dict) -> set[str]:
    return {n for n in after if n in before and not torch.equal(before[n], after[n])}


def test_paper_switch_sets_every_knob_to_the_papers_value():
    tuned = apply_overrides(
        Params(),
        [
            "method.shared_lr_scale=0.1",
            "method.gate_bias=2.0",
            "method.task_gates=true",
            "method.replay_per_task=8",
            "method.discriminator_span=prompt",
        ],
    )
    assert tuned.method.task_gates and tuned.method.replay_per_task == 8
    paper = apply_overrides(tuned, ["method.paper=true"])
    for key, value in PAPER_SETTING.items():
        assert getattr(paper.method, key) == value, key
    with pytest.raises(ParamsError, match="discriminator_span"):
        apply_overrides(Params(), ["method.discriminator_span=answers"])


def test_a_bank_that_predates_the_knobs_loads_with_the_papers_values():
    recorded = {"name": "moecl", "adv_alpha": 0.1, "memory_per_task": 0, "mode": "instruction"}
    method = MethodConfig.from_manifest(recorded)
    for key, value in PAPER_SETTING.items():
        assert getattr(method, key) == value, key


def test_shared_lr_scale_zero_leaves_the_shared_expert_as_it_was(tiny_base, fast_params, two_tasks, tmp_path):
    params = copy.deepcopy(fast_params)
    params.method = paper_method(name="moecl_nogan", shared_lr_scale=0.0)  # one gate, in the shared file
    before, after = _two_steps(tiny_base, params, two_tasks, tmp_path)
    old, new = before.shared_parameters(), after.shared_parameters()
    changed = _changed(old, new)
    assert not any(".shared." in n for n in changed), "the shared expert moved at learning rate 0"
    assert any(".gate." in n for n in changed), "the gate keeps the full learning rate"
    t2 = after.task_parameters("sentiment")
    assert any(n.endswith(".B") and t2[n].abs().sum() > 0 for n in t2), "the dedicated expert did not learn"


def test_shared_lr_scale_sets_the_shared_experts_own_learning_rate(tiny_base):
    from moecl.train.loop import optimizer_groups

    base_model, _ = tiny_base.load()
    method = paper_method(name="moecl", shared_lr_scale=0.25)
    model = MoECLModel(base_model, Params().lora, method)
    model.add_task(TaskInfo("t1", ["a", "b"]))
    trainable = model.trainable_parameters("t1")
    groups = optimizer_groups(model, "t1", trainable, method, lr=1e-3)
    shared = {id(p) for p in model.shared_expert_parameters("t1")}
    assert [g.get("lr") for g in groups] == [None, pytest.approx(2.5e-4)]
    assert {id(p) for p in groups[1]["params"]} == shared
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_gate_lr_scale_zero_leaves_the_gate_as_it_was(tiny_base, fast_params, two_tasks, tmp_path):
    params = copy.deepcopy(fast_params)
    params.method = paper_method(name="moecl_nogan", gate_lr_scale=0.0)  # one gate, trained by every step
    before, after = _two_steps(tiny_base, params, two_tasks, tmp_path)
    changed = _changed(before.shared_parameters(), after.shared_parameters())
    assert any(".gate." in n for n in before.shared_parameters())
    assert not any(".gate." in n for n in changed), "the gate moved at learning rate 0"
    assert any(".shared." in n for n in changed), "the shared expert keeps the full learning rate"


def test_gate_lr_scale_gives_the_steps_own_gate_its_learning_rate(tiny_base):
    from moecl.train.loop import optimizer_groups

    method = MethodConfig(name="moecl", gate_lr_scale=20.0, shared_lr_scale=0.5)  # the defaults' task gates
    model = MoECLModel(tiny_base.load()[0], Params().lora, method)
    model.add_task(TaskInfo("t1", ["a", "b"]))
    model.add_task(TaskInfo("t2", ["a", "b"]))
    trainable = model.trainable_parameters("t2")
    groups = optimizer_groups(model, "t2", trainable, method, lr=1e-3)
    assert [g.get("lr") for g in groups] == [None, pytest.approx(5e-4), pytest.approx(2e-2)]
    gate_ids = {id(p) for layer in model.layers for p in layer.task_gates[expert_name("t2")].parameters()}
    assert {id(p) for p in groups[2]["params"]} == gate_ids
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    with pytest.raises(ParamsError, match="gate_lr_scale"):
        apply_overrides(Params(), ["method.gate_lr_scale=-1"])


def _beta_t(model: MoECLModel, tok, tasks: list[str]) -> torch.Tensor:
    """The gate's weight on each row's own expert, per layer: [layers, rows] (mean over real tokens)."""
    captured = []
    ids = tok(["alpha beta gamma"] * len(tasks), return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    hooks = []
    for layer in model.layers:

        def grab(module, args, out):
            captured.append(torch.softmax(out, -1)[..., 1].mean(-1))

        if layer.gate is not None:
            hooks.append(layer.gate.register_forward_hook(grab))
        else:
            hooks += [g.register_forward_hook(grab) for g in layer.task_gates.values()]
    try:
        with torch.no_grad(), model.routed(tasks, attention_mask=mask):
            model.lm_logits(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(captured)


def test_gate_bias_starts_the_gate_leaning_to_the_dedicated_expert(tiny_base, tiny_tok):
    base_model, _ = tiny_base.load()
    model = MoECLModel(base_model, Params().lora, paper_method(name="moecl", gate_bias=1.25))
    model.add_task(TaskInfo("t1", ["a", "b"]))
    beta = _beta_t(model, tiny_tok, ["t1"])
    expected = torch.sigmoid(torch.tensor(1.25))
    assert torch.allclose(beta, expected.expand_as(beta), atol=0.03)
    paper = MoECLModel(tiny_base.load()[0], Params().lora, paper_method(name="moecl"))
    paper.add_task(TaskInfo("t1", ["a", "b"]))
    assert torch.allclose(_beta_t(paper, tiny_tok, ["t1"]), torch.tensor(0.5), atol=0.03)


def test_task_gates_are_frozen_with_their_task(tiny_base, fast_params, two_tasks, tmp_path):
    params = copy.deepcopy(fast_params)
    params.method.task_gates = True
    params.method.gate_bias = 1.0
    before, after = _two_steps(tiny_base, params, two_tasks, tmp_path)
    assert all(layer.gate is None for layer in after.layers)
    old_t1 = before.task_parameters("topics")
    new_t1 = after.task_parameters("topics")
    assert any(".gate." in n for n in new_t1), "task 1 has no gate of its own"
    assert not _changed(old_t1, new_t1), "task 1's expert or gate moved in task 2's step"
    t2 = after.task_parameters("sentiment")
    fresh = MoECLModel(tiny_base.load()[0], params.lora, params.method)
    fresh.add_task(TaskInfo("topics", ["x"]))
    fresh.add_task(TaskInfo("sentiment", ["x"]))
    initial = fresh.task_parameters("sentiment")
    assert any(".gate." in n and not torch.equal(t2[n], initial[n]) for n in t2), (
        "task 2's gate did not learn"
    )


def test_a_mixed_batch_goes_through_each_rows_own_task_gate(tiny_base, tiny_tok):
    base_model, _ = tiny_base.load()
    model = MoECLModel(base_model, Params().lora, paper_method(name="moecl", task_gates=True))
    model.add_task(TaskInfo("t1", ["a", "b"]))
    model.add_task(TaskInfo("t2", ["a", "b"]))
    with torch.no_grad():
        for layer in model.layers:
            layer.task_gates[expert_name("t1")].weight.normal_(0, 0.5)
            layer.task_gates[expert_name("t2")].weight.normal_(0, 0.5)
            for p in layer.experts.parameters():
                p.normal_(0, 0.1)
    model.eval()
    ids = tiny_tok(["alpha beta gamma", "alpha beta gamma"], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with model.routed(["t1", "t2"]):
            mixed = model.lm_logits(ids, mask)
        with model.routed(["t1"]):
            alone_1 = model.lm_logits(ids[:1], mask[:1])
        with model.routed(["t2"]):
            alone_2 = model.lm_logits(ids[1:], mask[1:])
    torch.testing.assert_close(mixed[0:1], alone_1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1:2], alone_2, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # t2's rows read t2's gate: giving it t1's weights changes them
        for layer in model.layers:
            layer.task_gates[expert_name("t2")].weight.copy_(layer.task_gates[expert_name("t1")].weight)
        with model.routed(["t2"]):
            with_t1_gate = model.lm_logits(ids[1:], mask[1:])
    assert not torch.allclose(with_t1_gate, alone_2, atol=1e-4)


def test_orthogonal_shared_chunks_freeze_and_stay_orthogonal(tiny_base, fast_params, two_tasks, tmp_path):
    from moecl.train.terms import build_terms

    params = copy.deepcopy(fast_params)
    params.method = paper_method(shared_orthogonal=True)
    before, after = _two_steps(tiny_base, params, two_tasks, tmp_path)
    assert after.shared_names == (shared_chunk_name("topics"), shared_chunk_name("sentiment"))
    assert all(SHARED not in layer.experts for layer in after.layers)
    old_t1, new_t1 = before.task_parameters("topics"), after.task_parameters("topics")
    assert any(".shared_chunk." in n for n in new_t1)
    assert not _changed(old_t1, new_t1), "task 1's chunk of the shared expert moved"
    t2 = after.task_parameters("sentiment")
    assert any(".shared_chunk." in n and n.endswith(".B") and t2[n].abs().sum() > 0 for n in t2)
    terms = [t for t in build_terms(after, "sentiment", params.method) if hasattr(t, "olds")]
    penalty = terms[0](after, None, None)
    assert float(penalty["shared_orthogonality"]) > 0
    # the shared expert is the sum of the chunks: with the dedicated expert's gate weight forced to 0 the layer
    # equals the base FFN plus both chunks' deltas
    layer = after.layers[0]
    u = torch.randn(1, 3, layer.hidden)
    with torch.no_grad():
        layer.gate.weight.zero_()  # beta_s = beta_t = 0.5 on every token
        with after.routed(["topics"]):
            out = layer(u)
        for name in list(layer.experts):
            if name.startswith("t_"):
                for delta in layer.experts[name].values():
                    delta.B.zero_()
        with after.routed(["topics"]):
            shared_only = layer(u)
    assert not torch.allclose(out, shared_only)  # the dedicated expert contributed
    with torch.no_grad():
        base = layer.base
        h = base.act_fn(base.gate_proj(u) + _d(layer, "gate_proj", u)) * (
            base.up_proj(u) + _d(layer, "up_proj", u)
        )
        explicit = base.down_proj(h) + _d(layer, "down_proj", h)
        # beta_s = beta_t = 0.5; the dedicated expert is now zero, so it contributes the base FFN
        plain = base.down_proj(base.act_fn(base.gate_proj(u)) * base.up_proj(u))
    torch.testing.assert_close(shared_only, 0.5 * explicit + 0.5 * plain, rtol=1e-4, atol=1e-5)


def _d(layer, projection, x):
    return sum(layer.experts[n][projection](x) for n in layer.experts if n.startswith("s_"))


def test_prompt_span_pools_the_discriminator_over_the_prompt_alone(tiny_base, tiny_tok):
    base_model, _ = tiny_base.load()
    model = MoECLModel(base_model, Params().lora, paper_method(name="moecl", mode="instruction"))
    model.add_task(TaskInfo("t1", ["yes", "no"]))
    model.add_task(TaskInfo("t2", ["yes", "no"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.1)
    model.eval()
    enc = Encoder(tiny_tok, "t1", ["yes", "no"], "", "instruction", 64)
    pad = pad_id(tiny_tok)

    def pooled_logits(label: str, span: str) -> torch.Tensor:
        batch = collate([enc.encode("alpha beta gamma", label)], pad)
        with (
            torch.no_grad(),
            model.routed(
                batch.tasks, attention_mask=batch.discriminator_mask(span), collect_discriminator=True
            ) as routing,
        ):
            model.lm_logits(batch.input_ids, batch.attention_mask)
            return torch.cat(routing.discriminator_logits)

    # the answer is the last tokens of the row: the causal prompt positions do not see it
    assert torch.allclose(pooled_logits("yes", "prompt"), pooled_logits("no", "prompt"), atol=1e-6)
    assert not torch.allclose(pooled_logits("yes", "all"), pooled_logits("no", "all"), atol=1e-6)


class _TestSplitForbidden:
    """A task whose test split must never be read (replay may read its training records only)."""

    def __init__(self, task):
        self._task = task

    def __getattr__(self, name):
        if name in ("test", "dev"):
            raise AssertionError(f"replay read the {name} split of {self._task.task_id}")
        return getattr(self._task, name)


def test_replay_trains_on_earlier_tasks_training_records_only(tiny_base, fast_params, two_tasks, tmp_path):
    from moecl.train.step import run_step

    t1, t2 = two_tasks
    params = copy.deepcopy(fast_params)
    params.method.name = "seq_lora"
    params.method.replay_per_task = 6
    run_step(params, t1, base=tiny_base, out_bank=tmp_path / "b1", progress=False)
    result = run_step(
        params,
        t2,
        base=tiny_base,
        parent_bank=tmp_path / "b1",
        out_bank=tmp_path / "b2",
        progress=False,
        replay_tasks={"topics": _TestSplitForbidden(t1)},
    )
    assert result.outcome.replay_examples == 6
    assert result.outcome.train_examples < len(t2.train)  # the current task's own records, dev carved out


def test_replay_rows_train_the_shared_expert_through_their_own_task(tiny_base, tiny_tok, two_tasks):
    """With replay the shared expert gets the earlier task's gradient; without, it gets none of it."""
    from moecl.train.loop import replay_items, task_loss

    t1, t2 = two_tasks
    params = Params()
    params.method = MethodConfig(name="seq_lora", mode="classifier", replay_per_task=4)
    base_model, _ = tiny_base.load()
    model = MoECLModel(base_model, params.lora, params.method)
    for t in (t1, t2):
        model.add_task(TaskInfo(t.task_id, list(t.labels), t.instruction))
    items = replay_items(model, tiny_tok, {"topics": t1}, "sentiment", 4, params)
    assert len(items) == 4 and {i.task_id for i in items} == {"topics"}
    train_texts = {r.text for r in t1.train}
    enc = Encoder(tiny_tok, "topics", t1.labels, "", "classifier", params.train.max_length)
    encoded_train = {tuple(enc.encode(t).input_ids) for t in train_texts}
    assert all(tuple(i.input_ids) in encoded_train for i in items)
    batch = collate(items, pad_id(tiny_tok))
    model.trainable_parameters("sentiment")
    with model.routed(batch.tasks, attention_mask=batch.attention_mask):
        loss, out = task_loss(model, "classifier", batch)
    assert out.logits.shape == (4, len(t1.labels))
    loss.backward()
    shared = model.shared_expert_parameters("sentiment")
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)


def test_a_step_refuses_a_bank_of_another_structure(tiny_base, fast_params, two_tasks, tmp_path):
    from moecl.errors import MoeclError
    from moecl.train.step import run_step

    t1, t2 = two_tasks
    run_step(fast_params, t1, base=tiny_base, out_bank=tmp_path / "b1", progress=False)
    other = copy.deepcopy(fast_params)
    flipped = not fast_params.method.task_gates
    other.method = dataclasses.replace(other.method, task_gates=flipped)
    with pytest.raises(MoeclError, match=f"method.task_gates={flipped} but the bank"):
        run_step(
            other, t2, base=tiny_base, parent_bank=tmp_path / "b1", out_bank=tmp_path / "b2", progress=False
        )
    assert not (tmp_path / "b2").exists()


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"task_gates": True, "gate_bias": 1.0},
        {"shared_orthogonal": True},
        {"gate_bias": 1.5},
    ],
)
def test_bank_round_trip_gives_the_trained_models_outputs(
    tiny_base, tiny_tok, fast_params, two_tasks, tmp_path, knobs
):
    """Train two tasks in memory, save, load: the loaded bank answers exactly as the model that was trained."""
    from moecl.bank import load_bank, save_bank
    from moecl.train.loop import train_on_task

    params = copy.deepcopy(fast_params)
    params.method = dataclasses.replace(params.method, **knobs)
    base_model, tok = tiny_base.load()
    model = MoECLModel(base_model, params.lora, params.method)
    for t in two_tasks:
        model.add_task(TaskInfo(t.task_id, list(t.labels), t.instruction))
        train_on_task(model, tok, t, params, progress=False)
    save_bank(
        model,
        tmp_path / "bank",
        base=tiny_base,
        trained_task="sentiment",
        parent_dir=None,
        steps=["topics", "sentiment"],
        history={},
        lineage={},
    )
    loaded = load_bank(tmp_path / "bank", tiny_base).model
    ids = tiny_tok(["alpha beta gamma", "goal team"], return_tensors="pt", padding=True)
    for task in ("topics", "sentiment"):
        with torch.no_grad():
            with model.routed([task, task]):
                trained = model.classify(ids["input_ids"], ids["attention_mask"], task)
            with loaded.routed([task, task]):
                reloaded = loaded.classify(ids["input_ids"], ids["attention_mask"], task)
        torch.testing.assert_close(reloaded, trained, rtol=0, atol=0)
        untrained = MoECLModel(tiny_base.load()[0], params.lora, params.method)
        for t in two_tasks:
            untrained.add_task(TaskInfo(t.task_id, list(t.labels)))
        untrained.heads.load_state_dict(model.heads.state_dict())
        with torch.no_grad(), untrained.routed([task, task]):
            fresh = untrained.classify(ids["input_ids"], ids["attention_mask"], task)
        assert not torch.allclose(fresh, trained, atol=1e-6)  # the experts the bank carries matter


def test_a_warm_started_expert_starts_the_new_task_at_the_shared_expert(tiny_base, tiny_tok):
    """dedicated_init "shared": the new task's expert is a copy of the shared expert, so the layer computes
    beta_s FFN_s + beta_t FFN_s = FFN_s whatever the gate says; with the paper's zero init the gate decides how
    much of FFN_s the new task gets."""

    def model_after_task1(dedicated_init):
        method = paper_method(name="moecl", dedicated_init=dedicated_init)
        model = MoECLModel(tiny_base.load()[0], Params().lora, method)
        model.add_task(TaskInfo("t1", ["a", "b"]))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a trained shared expert (B != 0)
            for layer in model.layers:
                for p in layer.experts[SHARED].parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        model.add_task(TaskInfo("t2", ["a", "b"]))
        model.eval()
        return model

    ids = tiny_tok(["alpha beta gamma"], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)

    def logits_with_gate(model, std):
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in model.layers:
                layer.gate.weight.copy_(torch.randn(layer.gate.weight.shape, generator=generator) * std)
            with model.routed(["t2"]):
                return model.lm_logits(ids, mask)

    warm, cold = model_after_task1("shared"), model_after_task1("zero")
    for layer in warm.layers:
        for name, p in layer.experts[expert_name("t2")].named_parameters():
            assert torch.equal(p, layer.experts[SHARED].get_parameter(name))
    torch.testing.assert_close(logits_with_gate(warm, 0.0), logits_with_gate(warm, 2.0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits_with_gate(cold, 0.0), logits_with_gate(cold, 2.0), atol=1e-4)
    with pytest.raises(ParamsError, match="dedicated_init"):
        apply_overrides(Params(), ["method.dedicated_init=shared", "method.shared_orthogonal=true"])


def test_an_expert_started_from_the_previous_one_copies_the_newest_earlier_expert(tiny_base, tiny_tok):
    """dedicated_init "previous" (per_task_lora+from_previous: seq_lora's path with each task's adapter kept): a
    new task's expert is a copy of the newest earlier task's expert, so the new task starts answering as that
    task does; the first task's expert starts at B = 0 (the base model), and the zero init starts every task
    there."""
    ids = tiny_tok(["alpha beta gamma"], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    generator = torch.Generator().manual_seed(0)

    def train(model, task):  # stands for a trained expert (B != 0)
        with torch.no_grad():
            for layer in model.layers:
                for p in layer.experts[expert_name(task)].parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.2)

    def logits(model, task):
        model.eval()
        with torch.no_grad(), model.routed([task]):
            return model.lm_logits(ids, mask)

    def bank(dedicated_init):
        method = paper_method(name="per_task_lora", dedicated_init=dedicated_init)
        model = MoECLModel(tiny_base.load()[0], Params().lora, method)
        model.add_task(TaskInfo("t1", ["a", "b"]))
        first = logits(model, "t1")
        train(model, "t1")
        model.add_task(TaskInfo("t2", ["a", "b"]))
        return model, first

    chained, first = bank("previous")
    untouched = tiny_base.load()[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(first, untouched(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(logits(chained, "t2"), logits(chained, "t1"))
    train(chained, "t2")
    chained.add_task(TaskInfo("t3", ["a", "b"]))
    torch.testing.assert_close(logits(chained, "t3"), logits(chained, "t2"))  # the newest, not the first
    assert not torch.allclose(logits(chained, "t3"), logits(chained, "t1"), atol=1e-4)
    isolated, _ = bank("zero")
    torch.testing.assert_close(logits(isolated, "t2"), first)
    assert not torch.allclose(logits(isolated, "t2"), logits(isolated, "t1"), atol=1e-4)


def test_the_evolution_replays_each_earlier_tasks_last_promoted_snapshot(tmp_path, two_tasks):
    """evolve.replay_tasks reads an earlier task's snapshot (its last promoted version), not its current
    folder, which may already hold a newer, unpromoted version; with replay off it reads nothing."""
    from moecl.data.importers import write_task
    from moecl.evolve import replay_tasks, snapshot_dir

    topics, sentiment = two_tasks
    params = Params()
    params.data.root = str(tmp_path / "data")
    params.registry.root = str(tmp_path / "registry")
    snap = snapshot_dir(params, "topics")
    write_task(snap.parent, "topics", topics.labels, topics.train, topics.test)
    newer = [dataclasses.replace(r, text="newer " + r.text) for r in topics.train]
    write_task(params.data.root, "topics", topics.labels, newer, topics.test)
    params.method.replay_per_task = 0
    assert replay_tasks(params, ["topics"], exclude="sentiment") is None  # replay off: nothing read
    params.method.replay_per_task = 4
    replayed = replay_tasks(params, ["topics", "sentiment"], exclude="sentiment")
    assert list(replayed) == ["topics"]
    assert {r.text for r in replayed["topics"].train} == {r.text for r in topics.train}

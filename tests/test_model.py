import copy
import filecmp
import math

import pytest
import torch

from moecl.config import METHODS, MethodConfig, Params
from moecl.model.moecl_model import SHARED, MoECLModel, TaskInfo, expert_name
from moecl.testing import model_with_tasks, paper_method


def _inputs(tok, texts=("goal team coach", "profit bank stock merger revenue")):
    enc = tok(list(texts), return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["classifier", "instruction"])
def test_at_init_the_mixture_equals_the_base_model(tiny_base, tiny_tok, method, mode):
    base_model, _ = tiny_base.load()
    ids, mask = _inputs(tiny_tok)
    with torch.no_grad():
        reference = base_model(
            input_ids=ids, attention_mask=mask, position_ids=MoECLModel.position_ids(mask)
        ).logits
    model = MoECLModel(base_model, Params().lora, MethodConfig(name=method, mode=mode))
    model.add_task(TaskInfo("t1", ["x", "y"]))
    model.add_task(TaskInfo("t2", ["x", "y"]))
    model.eval()
    with torch.no_grad(), model.routed(["t2", "t2"]):
        mixed = model.lm_logits(ids, mask)
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_what_changed_after_two_steps(tiny_base, fast_params, two_tasks, tmp_path):
    """Base and task-1 expert/head bit-identical; shared expert, gates, discriminators, task-2 expert changed."""
    from moecl.bank import load_bank
    from moecl.train.step import run_step

    t1, t2 = two_tasks
    params = copy.deepcopy(fast_params)
    params.method = paper_method(memory_per_task=4)  # memory: the discriminator sees two classes in step 2
    run_step(params, t1, base=tiny_base, out_bank=tmp_path / "b1", progress=False)
    before = load_bank(tmp_path / "b1", tiny_base).model
    result = run_step(
        params, t2, base=tiny_base, parent_bank=tmp_path / "b1", out_bank=tmp_path / "b2", progress=False
    )
    after = load_bank(tmp_path / "b2", tiny_base).model
    assert result.new_task and result.losses is not None

    fresh_base, _ = tiny_base.load()
    for name, p in fresh_base.named_parameters():  # the frozen base: bit-identical to a fresh copy
        module_name = name.replace(".mlp.", ".mlp.base.")
        torch.testing.assert_close(dict(after.base_model.named_parameters())[module_name], p, rtol=0, atol=0)

    old_t1 = before.task_parameters("topics")
    for name, p in after.task_parameters("topics").items():
        assert torch.equal(p, old_t1[name]), f"task-1 parameter {name} changed"
    old_shared = before.shared_parameters()
    new_shared = after.shared_parameters()
    changed = {n for n in new_shared if n in old_shared and not torch.equal(new_shared[n], old_shared[n])}
    assert any(".shared." in n and n.endswith(".B") for n in changed), "shared expert did not change"
    assert any(".gate." in n for n in changed), "gates did not change"
    assert any(".discriminator." in n for n in new_shared)
    for layer in after.layers:  # discriminators grew to 2 tasks
        assert layer.discriminator.out_features == 2
    assert any(".discriminator." in n for n in changed), "discriminators did not change"
    t2_params = after.task_parameters("sentiment")
    assert any(n.endswith(".B") and t2_params[n].abs().sum() > 0 for n in t2_params), (
        "task-2 expert untrained"
    )
    assert filecmp.cmp(
        tmp_path / "b1" / "expert-topics.safetensors",
        tmp_path / "b2" / "expert-topics.safetensors",
        shallow=False,
    )


def test_discriminators_learn_while_the_shared_expert_is_reversed(tiny_base, tiny_tok):
    """AdamW on L_adv through the reversal layer: the discriminators still drive their loss down (they minimise
    it) although the shared expert upstream is pushed the other way."""
    from moecl.model.encoding import Encoded, collate, pad_id
    from moecl.train.terms import AdversarialTerm

    base_model, _ = tiny_base.load()
    torch.manual_seed(0)
    model = MoECLModel(base_model, Params().lora, paper_method(name="moecl", adv_alpha=0.1))
    model.add_task(TaskInfo("a", ["x", "y"]))
    model.add_task(TaskInfo("b", ["x", "y"]))
    texts = [("goal team", "a"), ("profit bank stock", "b"), ("coach win cup", "a"), ("merger trade", "b")]
    batch = collate([Encoded(tiny_tok(t)["input_ids"], 0, -1, task) for t, task in texts], pad_id(tiny_tok))
    shared = model.shared_parameters()
    for p in shared.values():
        p.requires_grad_(True)
    discriminators = [p for n, p in shared.items() if ".discriminator." in n]
    experts = [p for n, p in shared.items() if ".discriminator." not in n]
    assert discriminators and experts
    # The reversed (maximising) side gets a smaller step: with equal steps it can outrun a linear discriminator
    # by scaling its features, which is what the task loss prevents in a real step.
    optimizer = torch.optim.AdamW([{"params": discriminators, "lr": 1e-1}, {"params": experts, "lr": 1e-4}])
    model.train()
    losses = []
    for _ in range(30):
        with model.routed(
            batch.tasks, attention_mask=batch.attention_mask, collect_discriminator=True, reverse_scale=0.1
        ) as routing:
            model.decoder_hidden(batch.input_ids, batch.attention_mask)
            loss = AdversarialTerm(0.1)(model, batch, routing)["discriminator"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=0.05)  # an untrained discriminator: chance
    assert sum(losses[-5:]) / 5 < losses[0] - 0.03, losses  # seeded: 0.693 -> 0.644 here


def test_a_step_reports_its_losses_by_name(tiny_base, fast_params, two_tasks, tmp_path):
    from moecl.train.step import run_step

    params = copy.deepcopy(fast_params)
    params.method.memory_per_task = 8
    params.method.adv_alpha = 0.1
    params.train.dev_fraction = 0.0
    t1, t2 = two_tasks
    run_step(params, t1, base=tiny_base, out_bank=tmp_path / "b1", progress=False)
    result = run_step(
        params, t2, base=tiny_base, parent_bank=tmp_path / "b1", out_bank=tmp_path / "b2", progress=False
    )
    assert result.outcome.losses
    for loss in result.outcome.losses:  # total = task + adversarial, adversarial = -alpha * L_adv
        assert loss.discriminator > 0
        assert loss.adversarial == pytest.approx(-0.1 * loss.discriminator)
        assert loss.total == pytest.approx(loss.task + loss.adversarial)


def test_moecl_and_moecl_nogan_differ_by_the_adversarial_term_alone(
    tiny_base, fast_params, two_tasks, tmp_path
):
    """On a bank's first task the discriminator has one class, so L_adv and its gradient are exactly zero: with
    the discriminators initialised from their own generator (not torch's global one), moecl draws the same
    dropout masks as moecl_nogan and trains bit-identical experts and gates."""
    from safetensors.torch import load_file

    from moecl.train.step import run_step

    trained = {}
    for name in ("moecl_nogan", "moecl"):
        params = copy.deepcopy(fast_params)
        params.method.name, params.method.adv_alpha = name, 0.1
        assert params.lora.dropout > 0  # the masks are what an extra global draw would shift
        run_step(params, two_tasks[0], base=tiny_base, out_bank=tmp_path / name, progress=False)
        tensors = load_file(tmp_path / name / "shared.safetensors")
        tensors |= load_file(tmp_path / name / "expert-topics.safetensors")
        trained[name] = {k: v for k, v in tensors.items() if ".discriminator." not in k}
    assert trained["moecl"].keys() == trained["moecl_nogan"].keys()
    assert any(k.endswith(".B") and v.abs().sum() > 0 for k, v in trained["moecl"].items())  # it trained
    for key, value in trained["moecl_nogan"].items():
        assert torch.equal(trained["moecl"][key], value), key


def test_mixed_batch_routes_each_sample_to_its_own_expert(tiny_base, tiny_tok):
    base_model, _ = tiny_base.load()
    model = MoECLModel(base_model, Params().lora, paper_method(name="moecl"))
    model.add_task(TaskInfo("a", ["x", "y"]))
    model.add_task(TaskInfo("b", ["x", "y"]))
    with torch.no_grad():
        for layer in model.layers:
            for name in (expert_name("a"), expert_name("b"), SHARED):
                for delta in layer.experts[name].values():
                    delta.B.normal_(0, 0.5)
    model.eval()
    ids, mask = _inputs(tiny_tok)
    with torch.no_grad():
        with model.routed(["a", "b"]):
            mixed = model.lm_logits(ids, mask)
        with model.routed(["a", "a"]):
            only_a = model.lm_logits(ids, mask)
        with model.routed(["b", "b"]):
            only_b = model.lm_logits(ids, mask)
    torch.testing.assert_close(mixed[0], only_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], only_b[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(only_a[1], only_b[1])


def test_base_projections_run_once_per_layer(tiny_base, tiny_tok):
    """The cost claim: gate/up/down base projections run once per forward, whatever the number of experts."""
    base_model, _ = tiny_base.load()
    model = MoECLModel(base_model, Params().lora, paper_method(name="moecl"))
    for i in range(5):
        model.add_task(TaskInfo(f"t{i}", ["x", "y"]))
    calls = {"gate_proj": 0, "up_proj": 0, "down_proj": 0}
    for layer in model.layers:
        for proj in calls:
            getattr(layer.base, proj).register_forward_hook(
                lambda *a, _p=proj: calls.__setitem__(_p, calls[_p] + 1)
            )
    ids, mask = _inputs(tiny_tok)
    with torch.no_grad(), model.routed(["t3", "t3"]):
        model.lm_logits(ids, mask)
    n = len(model.layers)
    assert calls == {"gate_proj": n, "up_proj": n, "down_proj": n}


def test_trainable_set_is_exactly_shared_plus_current_task(tiny_base):
    base_model, _ = tiny_base.load()
    model = MoECLModel(base_model, Params().lora, paper_method(name="moecl"))
    model.add_task(TaskInfo("a", ["x", "y"]))
    model.add_task(TaskInfo("b", ["x", "y"]))
    trainable = {id(p) for p in model.trainable_parameters("b")}
    expected = {
        id(p) for p in list(model.shared_parameters().values()) + list(model.task_parameters("b").values())
    }
    assert trainable == expected
    assert all(not p.requires_grad for p in model.task_parameters("a").values())
    assert all(not p.requires_grad for p in model.base_model.parameters() if id(p) not in expected)


def test_dropout_keep_mask_drops_p_and_keeps_the_mean():
    from moecl.model.lora import keep_mask

    like = torch.empty(512, 384)
    assert keep_mask(like, 0.0) is None
    torch.manual_seed(3)
    mask = keep_mask(like, 0.05)
    torch.manual_seed(3)
    assert torch.equal(mask, keep_mask(like, 0.05))  # seeded
    assert mask.shape == like.shape and mask.dtype == like.dtype
    dropped = (mask == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.003
    values = mask.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.95, rel=1e-4)
    assert abs(mask.mean().item() - 1.0) < 0.005
    rows_dropped = (mask == 0).float().mean(dim=1)  # no position is favoured (every 16-bit slice is uniform)
    assert rows_dropped.min() > 0.0 and rows_dropped.max() < 0.15
    cols_dropped = (mask == 0).float().mean(dim=0)
    assert cols_dropped.max() < 0.15


def test_the_answer_window_loss_equals_the_loss_over_every_position(tiny_base, fast_params, two_tasks):
    """The LM head runs on the answer window only: the loss and every gradient are those of the full logits
    (answers of different lengths, left padding and a label-free memory row in one batch)."""
    import torch.nn.functional as F

    from moecl.model.encoding import IGNORE_INDEX, Encoded, Encoder, collate, pad_id
    from moecl.train.loop import task_loss

    base_model, tok = tiny_base.load()
    fast_params.lora.dropout = 0.0
    old, new = two_tasks
    infos = [TaskInfo(t.task_id, list(t.labels)) for t in two_tasks]
    model = model_with_tasks(base_model, fast_params.lora, fast_params.method, infos, b_std=0.05)
    model.train()
    enc = Encoder(tok, new.task_id, new.labels, new.instruction, "instruction", 64)
    items = [enc.encode(r.text, r.label) for r in new.train[:5]]
    memory = [Encoded(enc.encode(old.train[0].text).input_ids, 10**6, -1, old.task_id)]
    batch = collate(items + memory, pad_id(tok), [True] * 5 + [False])
    width = batch.input_ids.shape[1]
    window = batch.answer_window()
    assert 2 < window < width
    assert (batch.lm_labels[:, : width - window + 1] == IGNORE_INDEX).all()  # no label left outside it
    assert len({len(e.input_ids) - e.answer_start for e in items}) > 1  # answers of different lengths
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(compute):
        with model.routed(batch.tasks, attention_mask=batch.attention_mask):
            loss = compute()
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    def full():
        logits = model.lm_logits(batch.input_ids, batch.attention_mask).float()
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            batch.lm_labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
        )

    reference, reference_grads = loss_and_grads(full)
    windowed, grads = loss_and_grads(lambda: task_loss(model, "instruction", batch, new.task_id)[0])
    torch.testing.assert_close(windowed, reference)
    for g, r in zip(grads, reference_grads):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    assert any(r is not None and r.abs().max() > 0 for r in reference_grads)


def test_option_scores_are_each_options_likelihood_after_its_prompt(tiny_base, tiny_tok, two_tasks):
    """Likelihood scoring (batched, left-padded, LM head on the answer window only) gives, per text, the
    softmax over options of log p(option | prompt) computed one unpadded sequence at a time."""
    from moecl.model.encoding import Encoder
    from moecl.model.inference import option_scores

    base_model, tok = tiny_base.load()
    task = two_tasks[0]
    info = TaskInfo(task.task_id, list(task.labels), task.instruction)
    method = paper_method(name="moecl", mode="instruction")
    model = model_with_tasks(base_model, Params().lora, method, [info], b_std=0.05)
    model.eval()
    texts = [r.text for r in task.test[:3]]
    scores = option_scores(model, tok, info, texts, max_length=64, batch_size=4)
    per_token = option_scores(model, tok, info, texts, max_length=64, batch_size=4, per_token=True)

    enc = Encoder(tok, info.task_id, info.labels, info.instruction, "instruction", 64)
    eos = tok.eos_token_id
    for text, got, got_per_token in zip(texts, scores, per_token):
        prompt = enc.encode(text, with_answer=False).input_ids
        loglik, lengths = [], []
        for label in info.labels:
            answer = enc.answer_ids[label]
            answer = answer[:-1] if (len(answer) > 1 and answer[-1] == eos) else answer
            ids = torch.tensor([prompt + answer])
            with torch.no_grad(), model.routed([info.task_id]):
                logp = torch.log_softmax(model.lm_logits(ids, torch.ones_like(ids)).float()[0], -1)
            loglik.append(sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(answer)))
            lengths.append(len(answer))
        expected = torch.softmax(torch.tensor(loglik), -1)
        torch.testing.assert_close(
            torch.tensor([got[label] for label in info.labels]), expected, rtol=1e-4, atol=1e-5
        )
        normalised = torch.softmax(torch.tensor(loglik) / torch.tensor(lengths, dtype=torch.float), -1)
        torch.testing.assert_close(
            torch.tensor([got_per_token[label] for label in info.labels]), normalised, rtol=1e-4, atol=1e-5
        )
    assert (
        len({len(a) for a in enc.answer_ids.values()}) > 1
    )  # options of different lengths, or the test is moot


def test_a_mixed_batch_gives_each_expert_the_gradient_of_its_own_rows(tiny_base, tiny_tok):
    """Rows routed to different experts in one batch: every parameter's gradient is the sum of what each row
    gives alone (rows do not interact, so grouping them must not change any gradient)."""
    base_model, _ = tiny_base.load()
    infos = [TaskInfo(t, ["x", "y"]) for t in ("a", "b", "c")]
    model = model_with_tasks(base_model, Params().lora, paper_method(name="moecl"), infos, b_std=0.3)
    model.eval()  # no dropout: the same computation row by row
    ids, mask = _inputs(tiny_tok, ("goal team coach", "profit bank stock merger revenue", "rain wind storm"))
    routes = ["a", "b", "a"]
    weight = torch.randn(
        ids.shape[0],
        ids.shape[1],
        model.base_model.config.vocab_size,
        generator=torch.Generator().manual_seed(0),
    )
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(rows):
        with model.routed([routes[i] for i in rows]):
            loss = (model.lm_logits(ids[rows], mask[rows]) * weight[rows]).sum()
        return [
            g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)
        ]

    mixed = grads([0, 1, 2])
    alone = [grads([i]) for i in range(3)]
    for k, g in enumerate(mixed):
        torch.testing.assert_close(g, sum(a[k] for a in alone), rtol=1e-3, atol=1e-5)
    named = dict(zip([n for n, p in model.named_parameters() if p.requires_grad], mixed))
    assert any(g.abs().max() > 0 for n, g in named.items() if expert_name("b") in n)  # row 1's expert learns
    assert all(g.abs().max() == 0 for n, g in named.items() if expert_name("c") in n)  # no row routed to c


@pytest.mark.parametrize("method", METHODS)
def test_inference_reuses_buffers_without_changing_any_output(tiny_base, tiny_tok, method):
    """Under no_grad the layers add and multiply into their own fresh buffers; the logits must be exactly
    those of the autograd path (a buffer shared between the experts' branches, if overwritten, would not)."""
    base_model, _ = tiny_base.load()
    infos = [TaskInfo(t, ["x", "y"]) for t in ("a", "b")]
    config = MethodConfig(name=method, mode="instruction")
    model = model_with_tasks(base_model, Params().lora, config, infos, b_std=0.3)
    model.eval()
    ids, mask = _inputs(tiny_tok)
    with model.routed(["a", "b"]):
        tracked = model.lm_logits(ids, mask)
        with torch.no_grad():
            fast = model.lm_logits(ids, mask)
    assert tracked.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, tracked.detach(), rtol=1e-5, atol=1e-6)


def test_the_fused_layer_is_the_gated_sum_of_two_full_experts(tiny_base):
    """With trained deltas (B != 0) and a gate far from uniform, the fused computation (base projections once,
    deltas per expert, one down projection of the mixed hidden state) equals beta_s FFN_s(u) + beta_t FFN_t(u)
    with each expert's FFN computed from its own merged weights W + scale * B A."""
    base_model, _ = tiny_base.load()
    model = model_with_tasks(
        base_model, Params().lora, paper_method(name="moecl"), [TaskInfo("t1", ["a"])], 0.1
    )
    layer = model.layers[0]
    with torch.no_grad():
        layer.gate.weight.normal_(0, 1.0)
    model.eval()
    u = torch.randn(2, 5, layer.hidden, generator=torch.Generator().manual_seed(0))

    def merged(expert, projection):
        weight = getattr(layer.base, projection).weight
        delta = expert[projection]
        return weight + delta.scale * delta.B @ delta.A

    def ffn(expert_key):
        expert = layer.experts[expert_key]
        g = u @ merged(expert, "gate_proj").t()
        v = u @ merged(expert, "up_proj").t()
        return (layer.base.act_fn(g) * v) @ merged(expert, "down_proj").t()

    with torch.no_grad():
        beta = torch.softmax(u @ layer.gate.weight.t(), -1)
        expected = beta[..., :1] * ffn(SHARED) + beta[..., 1:] * ffn(expert_name("t1"))
        with model.routed(["t1", "t1"]):
            fused = layer(u)
    assert beta[..., 1].std() > 0.05  # the gate is far from uniform, so a wrong mixing rule would show
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)


def _two_task_moecl(tiny_base) -> MoECLModel:
    """moecl with tasks a and b, every LoRA B non-zero (so every delta acts), in eval mode (no dropout)."""
    tasks = [TaskInfo("a", ["x"]), TaskInfo("b", ["x"])]
    model = model_with_tasks(tiny_base.load()[0], Params().lora, paper_method(name="moecl"), tasks, 0.05)
    return model.eval()


def test_the_reversal_layer_flips_the_sign_of_an_independently_computed_gradient(
    tiny_base, tiny_tok, monkeypatch
):
    """The plain gradient of L_adv is computed with the reversal layer replaced by the identity; with the real
    layer the discriminators get that same gradient and the shared expert exactly -alpha times it."""
    import moecl.model.layer as layer_module
    from moecl.model.encoding import Encoded, collate, pad_id
    from moecl.train.terms import AdversarialTerm

    model = _two_task_moecl(tiny_base)
    texts = [("goal team", "a"), ("profit bank stock", "b"), ("coach win cup", "a")]
    batch = collate([Encoded(tiny_tok(t)["input_ids"], 0, -1, task) for t, task in texts], pad_id(tiny_tok))

    def grads():
        model.zero_grad(set_to_none=True)
        for p in model.shared_parameters().values():
            p.requires_grad_(True)
        with model.routed(
            batch.tasks, attention_mask=batch.attention_mask, collect_discriminator=True, reverse_scale=0.1
        ) as routing:
            model.decoder_hidden(batch.input_ids, batch.attention_mask)
            loss = AdversarialTerm(0.1)(model, batch, routing)["discriminator"]
        loss.backward()
        return {n: p.grad.clone() for n, p in model.shared_parameters().items() if p.grad is not None}

    reversed_grads = grads()
    monkeypatch.setattr(layer_module, "gradient_reversal", lambda x, scale: x)
    plain = grads()
    shared = [n for n in plain if ".shared." in n and plain[n].abs().sum() > 0]
    disc = [n for n in plain if ".discriminator." in n]
    assert shared and disc
    for n in disc:
        torch.testing.assert_close(reversed_grads[n], plain[n])
    for n in shared:
        torch.testing.assert_close(reversed_grads[n], -0.1 * plain[n], rtol=1e-4, atol=1e-9)


def test_the_discriminator_pools_real_tokens_only(tiny_base, tiny_tok):
    """A row's discriminator logits are the same alone and left-padded beside a longer row: padding is not
    pooled."""
    from moecl.model.encoding import Encoded, collate, pad_id

    model = _two_task_moecl(tiny_base)
    short = Encoded(tiny_tok("goal team")["input_ids"], 0, -1, "a")
    long = Encoded(tiny_tok("profit bank stock merger revenue trade market")["input_ids"], 0, -1, "b")

    def logits(items):
        batch = collate(items, pad_id(tiny_tok))
        with (
            torch.no_grad(),
            model.routed(
                batch.tasks,
                attention_mask=batch.attention_mask,
                collect_discriminator=True,
                reverse_scale=0.1,
            ) as routing,
        ):
            model.decoder_hidden(batch.input_ids, batch.attention_mask)
            return torch.stack(routing.discriminator_logits)  # [layers, rows, tasks]

    alone = logits([short])[:, 0]
    padded = logits([short, long])
    assert collate([short, long], pad_id(tiny_tok)).attention_mask[0].min() == 0  # the short row is padded
    torch.testing.assert_close(padded[:, 0], alone, rtol=1e-4, atol=1e-5)

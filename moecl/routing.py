"""Where MoE-CL's gate routes: the weight beta_t each task gets from its own (dedicated) expert.

MoE-CL mixes FFN(u) = beta_s FFN_shared(u) + beta_t FFN_t(u). A task's frozen expert protects it only as far as
the gate routes to it: 0.5 is the untrained gate, 1 is pure isolation. `dedicated_share` reads beta_t from a
forward pass over real prompts (hooks on the gates the task uses), averaged over the real tokens per layer;
`moecl eval --routing` prints it for a bank and the benchmark stores it with every moecl run.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from moecl.model.encoding import Encoder, collate, pad_id
from moecl.model.moecl_model import expert_name


@torch.no_grad()
def dedicated_share(
    model, tokenizer, task_id: str, texts: list[str], max_length: int, batch_size: int = 16
) -> list[float]:
    """Per layer, beta_t averaged over the real tokens of `texts` routed as `task_id` (through each layer's
    one gate, or the task's own gate with method.task_gates). ValueError for a model without gates."""
    layers, own = list(model.layers), expert_name(task_id)
    gates = [layer.gate or (layer.task_gates[own] if own in layer.task_gates else None) for layer in layers]
    if any(gate is None for gate in gates):
        raise ValueError("this bank has no gates: only the moecl methods mix a shared and a dedicated expert")
    info = model.task(task_id)
    encoder = Encoder(tokenizer, task_id, info.labels, info.instruction, model.mode, max_length)
    device = layers[0].base.down_proj.weight.device
    sums, tokens, captured, mask = torch.zeros(len(layers), dtype=torch.float64), 0.0, [], None

    def capture(_module, _inputs, logits):
        beta_t = torch.softmax(logits.float(), dim=-1)[..., 1]  # (batch, tokens)
        captured.append((beta_t * mask).sum().double())

    hooks = [gate.register_forward_hook(capture) for gate in gates]
    was_training = model.training
    try:
        model.eval()
        for start in range(0, len(texts), batch_size):
            batch = collate([encoder.encode(t) for t in texts[start : start + batch_size]], pad_id(tokenizer))
            batch, captured[:] = batch.to(device), []
            mask = batch.attention_mask.float()
            with model.routed(batch.tasks, attention_mask=batch.attention_mask):
                model.decoder_hidden(batch.input_ids, batch.attention_mask)
            sums += torch.stack(captured).cpu()  # the model may sit on a GPU; the sums stay on the CPU
            tokens += float(mask.sum())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return (sums / max(tokens, 1.0)).tolist()


def routing_summary(model, tokenizer, texts: dict[str, list[str]], max_length: int) -> dict[str, dict]:
    """task -> {"mean", "min", "max"} of beta_t over layers, on each task's `texts`."""
    out = {}
    for task_id, task_texts in texts.items():
        share = dedicated_share(model, tokenizer, task_id, task_texts, max_length)
        out[task_id] = {
            k: round(f(share), 6) for k, f in (("mean", statistics.fmean), ("min", min), ("max", max))
        }
    return out


def bank_routing(
    bank: str | Path, base, texts: dict[str, list[str]], max_length: int
) -> dict[str, dict] | None:
    """`routing_summary` of a bank on disk (loaded on the GPU when there is one); None for a method without a
    gate."""
    from moecl.bank import load_bank
    from moecl.model.base import preferred_device

    loaded = load_bank(bank, base, device=preferred_device())
    if not loaded.model.method.uses_gate:
        return None
    return routing_summary(loaded.model, loaded.tokenizer, texts, max_length)


def format_share(cell: dict[str, float]) -> str:
    """`0.781 [0.702, 0.843]`: the mean over layers [lowest, highest layer]."""
    return f"{cell['mean']:.3f} [{cell['min']:.3f}, {cell['max']:.3f}]"

"""How much each task's tokens use its own expert: the gate's weight beta_t, per task, per bank.

    python -m bench.routing BANK [BANK ...] [--preset cpu] [--tasks dbpedia amazon]

MoE-CL mixes two experts per layer, FFN(u) = beta_s FFN_shared(u) + beta_t FFN_t(u), with one gate per layer
for every task. A task's dedicated expert is frozen once the task is learned, so it protects that task only as
far as the gate routes to it; the rest of the output comes from the shared expert, which keeps training.
For each bank and task this prints beta_t averaged over the real tokens of the preset's test prompts: the
mean over layers, and the lowest and highest layer. Given the banks of one run in order (e.g.
W/moecl-instruction-order1/0-dbpedia ... 3-agnews) it shows how each task's routing moves as later tasks
train the shared gates.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moecl.model.encoding import Encoder, collate, pad_id
from moecl.model.moecl_model import expert_name


@torch.no_grad()
def dedicated_share(model, tokenizer, task_id: str, texts: list[str], max_length: int, batch_size: int = 16):
    """Per layer, beta_t (the gate's weight on the task's dedicated expert) averaged over the real tokens of
    `texts` routed as `task_id` (through the one gate of each layer, or the task's own gate with
    method.task_gates). Returns a list with one float per layer; raises ValueError for a model without gates
    (methods other than moecl)."""
    layers = list(model.layers)
    own = expert_name(task_id)
    gates = [layer.gate or (layer.task_gates[own] if own in layer.task_gates else None) for layer in layers]
    if any(gate is None for gate in gates):
        raise ValueError("this bank has no gates: only the moecl methods mix a shared and a dedicated expert")
    info = model.task(task_id)
    encoder = Encoder(tokenizer, task_id, info.labels, info.instruction, model.mode, max_length)
    device = layers[0].base.down_proj.weight.device
    sums = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0.0
    mask: torch.Tensor | None = None
    captured: list[torch.Tensor] = []

    def capture(_module, _inputs, logits):
        weights = torch.softmax(logits.float(), dim=-1)[..., 1]  # (batch, tokens): beta_t
        captured.append((weights * mask).sum().double())

    hooks = [gate.register_forward_hook(capture) for gate in gates]
    was_training = model.training
    try:
        model.eval()
        for start in range(0, len(texts), batch_size):
            batch = collate([encoder.encode(t) for t in texts[start : start + batch_size]], pad_id(tokenizer))
            batch = batch.to(device)
            mask = batch.attention_mask.float()
            captured.clear()
            with model.routed(batch.tasks, attention_mask=batch.attention_mask):
                model.decoder_hidden(batch.input_ids, batch.attention_mask)
            sums += torch.stack(captured).cpu()  # the model may sit on a GPU; the sums stay on the CPU
            tokens += float(mask.sum())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return (sums / max(tokens, 1.0)).tolist()


def summarise_share(share: list[float]) -> dict[str, float]:
    """A task's per-layer beta_t as {"mean", "min", "max"} over layers."""
    return {
        "mean": round(sum(share) / len(share), 6),
        "min": round(min(share), 6),
        "max": round(max(share), 6),
    }


def format_share(cell: dict[str, float]) -> str:
    return f"{cell['mean']:.3f} [{cell['min']:.3f}, {cell['max']:.3f}]"


def main(argv: list[str] | None = None) -> int:
    from bench.kept import add_arguments, load_kept_banks

    ap = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    ap.add_argument("banks", nargs="+", help="banks of a moecl method, e.g. every step of one run in order")
    add_arguments(ap)
    args = ap.parse_args(argv)
    kept = load_kept_banks(args, args.banks, reference=-1)  # the last bank knows every task

    print("beta_t, the gate's weight on the task's own expert (mean over layers [lowest, highest layer]),")
    print(f"over the real tokens of the {args.preset} preset's test prompts ({kept.mode} mode)")
    print(f"{'task':<10} " + " ".join(f"{Path(b).name:>24}" for b in args.banks))
    for task_id in kept.tasks:
        texts = [r.text for r in kept.data[task_id].test]
        cells = [
            format_share(
                summarise_share(
                    dedicated_share(bank.model, bank.tokenizer, task_id, texts, kept.params.train.max_length)
                )
            )
            if task_id in bank.model.task_ids
            else "-"
            for bank in kept.loaded
        ]
        print(f"{task_id:<10} " + " ".join(c.rjust(24) for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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


@torch.no_grad()
def dedicated_share(model, tokenizer, task_id: str, texts: list[str], max_length: int, batch_size: int = 16):
    """Per layer, beta_t (the gate's weight on the task's dedicated expert) averaged over the real tokens of
    `texts` routed as `task_id`. Returns a list with one float per layer; raises ValueError for a model
    without gates (methods other than moecl)."""
    layers = list(model.layers)
    if any(layer.gate is None for layer in layers):
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

    hooks = [layer.gate.register_forward_hook(capture) for layer in layers]
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


def main(argv: list[str] | None = None) -> int:
    from bench.backbones import params_base
    from bench.params import model_config
    from bench.presets import get_preset
    from bench.tasks import find_mtl5, load_mtl5
    from moecl.bank import load_bank

    ap = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    ap.add_argument("banks", nargs="+", help="banks of a moecl method, e.g. every step of one run in order")
    ap.add_argument("--preset", default="cpu", help="whose test sampling and sizes to use (default cpu)")
    ap.add_argument("--tasks", nargs="+", help="tasks to probe (default: every task of the last bank)")
    ap.add_argument("--data", help="the mtl5 folder (default $MOECL_MTL5, then ../shared/data/mtl5)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    preset = get_preset(args.preset)
    cfg = model_config(preset)
    base = params_base(cfg, "cpu")
    loaded = [load_bank(Path(b), base) for b in args.banks]
    mode = loaded[-1].model.mode
    size = preset.modes[mode]
    tasks = args.tasks or list(loaded[-1].model.task_ids)
    data = load_mtl5(find_mtl5(args.data), tasks, size.per_class, size.test_per_task, preset.seed)
    print("beta_t, the gate's weight on the task's own expert (mean over layers [lowest, highest layer]),")
    print(f"over the real tokens of the {args.preset} preset's test prompts ({mode} mode)")
    print(f"{'task':<10} " + " ".join(f"{Path(b).name:>24}" for b in args.banks))
    for task_id in tasks:
        cells = []
        for bank in loaded:
            if task_id not in bank.model.task_ids:
                cells.append(f"{'-':>24}")
                continue
            texts = [r.text for r in data[task_id].test]
            share = dedicated_share(bank.model, bank.tokenizer, task_id, texts, size.max_length)
            cells.append(f"{sum(share) / len(share):.3f} [{min(share):.3f}, {max(share):.3f}]".rjust(24))
        print(f"{task_id:<10} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

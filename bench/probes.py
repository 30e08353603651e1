"""What kept banks (`bench.run --workdir W --keep-banks`) learned: how two banks differ, and where the gate routes.

    python -m bench.probes agreement BANK_A BANK_B [--parameters-only] [--preset cpu] [--tasks ...]
    python -m bench.probes routing BANK [BANK ...] [--preset cpu] [--tasks ...]

agreement: two rows can score the same because they learned the same thing or because the test sample is too
small to show a difference. Per parameter group both banks carry (shared expert, gates, discriminators, each
dedicated expert): each bank's norm and the relative distance |a - b| / |a|, LoRA pairs taken as the weight
change B @ A; per task on the preset's test records: how many answers differ (greedy generation, or the head's
argmax) and the mean total-variation distance between the label probabilities (option likelihood, or softmax).

routing: MoE-CL mixes FFN(u) = beta_s FFN_shared(u) + beta_t FFN_t(u); a task's frozen expert protects it only as
far as the gate routes to it. Per bank and task: beta_t over the real tokens of the preset's test prompts, the
mean over layers [lowest, highest layer]; the banks of one run in order show how routing moves as later tasks
train. bench.run records the same figure for the final model of every moecl run (bench.runs.final_routing).
Banks load with the preset's backbone on the CPU and are scored on the preset's own test sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path

import torch

from moecl.model.encoding import Encoder, collate, pad_id
from moecl.model.moecl_model import expert_name

# ---------------------------------------------------------------------------------------------- agreement


def parameter_groups(bank: Path) -> dict[str, dict[str, torch.Tensor]]:
    """group name -> {tensor name: tensor}: "shared", "gate", "discriminator" and "expert <task>"."""
    from safetensors.torch import load_file

    from moecl.bank import SHARED_FILE, read_manifest

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(bank / SHARED_FILE).items():
        match = re.match(r"layers\.\d+\.(\w+)\.", name)
        groups.setdefault(match.group(1) if match else "other", {})[name] = tensor
    for task in read_manifest(bank).tasks:
        groups[f"expert {task.task_id}"] = load_file(bank / task.file)
    return groups


def _effective(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA pairs as the weight change they make (B @ A: A alone is mostly its random init); others as they are.
    Idempotent: a group already taken this way comes back unchanged."""
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(".B") and name[:-1] + "A" in tensors:
            out[name[:-2]] = tensor.float() @ tensors[name[:-1] + "A"].float()
        elif not (name.endswith(".A") and name[:-1] + "B" in tensors):
            out[name] = tensor.float()
    return out


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float | None:
    """|a - b| / |a| over the tensors both carry with the same shape, LoRA pairs as B @ A (None when they share
    none, or a is all zeros)."""
    a, b = _effective(a), _effective(b)
    common = [k for k in a if k in b and a[k].shape == b[k].shape]
    norm = sum(float(a[k].pow(2).sum()) for k in common)
    return math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in common) / norm) if norm else None


def weight_norm(tensors: dict[str, torch.Tensor]) -> float:
    """Frobenius norm over a group's tensors, LoRA pairs as B @ A: how large a change the group makes."""
    return math.sqrt(sum(float(t.pow(2).sum()) for t in _effective(tensors).values()))


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def output_agreement(loaded_a, loaded_b, task_id: str, records, params) -> dict:
    """Answers that differ and the total-variation distance of the label probabilities on `records`. Greedy
    generation scores nothing, so in instruction mode the probabilities take a second, likelihood pass."""
    from moecl.evaluate import task_predictions

    banks = (loaded_a, loaded_b)
    preds = [task_predictions(m.model, m.tokenizer, task_id, records, params) for m in banks]
    scored = preds
    if params.method.mode == "instruction":
        likelihood = dataclasses.replace(params.evaluate, instruction_eval="likelihood")
        scoring = dataclasses.replace(params, evaluate=likelihood)
        scored = [task_predictions(m.model, m.tokenizer, task_id, records, scoring) for m in banks]
    tv = [total_variation(p.scores, q.scores) for p, q in zip(*scored)]
    return {
        "records": len(records),
        "answers_differ": sum(p.label != q.label for p, q in zip(*preds)),
        "mean_tv_distance": sum(tv) / len(tv) if tv else None,
        "max_tv_distance": max(tv) if tv else None,
    }


# ---------------------------------------------------------------------------------------------- routing


@torch.no_grad()
def dedicated_share(model, tokenizer, task_id: str, texts: list[str], max_length: int, batch_size: int = 16):
    """Per layer, beta_t (the gate's weight on the task's dedicated expert) averaged over the real tokens of
    `texts` routed as `task_id` (through each layer's one gate, or the task's own gate with method.task_gates).
    ValueError for a model without gates (methods other than moecl)."""
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


def summarise_share(share: list[float]) -> dict[str, float]:
    """A task's per-layer beta_t as {"mean", "min", "max"} over layers."""
    return {
        "mean": round(sum(share) / len(share), 6),
        "min": round(min(share), 6),
        "max": round(max(share), 6),
    }


def format_share(cell: dict[str, float]) -> str:
    return f"{cell['mean']:.3f} [{cell['min']:.3f}, {cell['max']:.3f}]"


# ---------------------------------------------------------------------------------------------- command line


def _kept(args, banks: list[str], reference: int):
    """The banks, their mode, the preset's Params in that mode, the tasks to probe (those of
    `banks[reference]`, or --tasks) and the preset's data for them."""
    from bench.params import method_params
    from bench.presets import get_preset
    from bench.run import backbone
    from bench.tasks import find_mtl5, load_mtl5
    from moecl.bank import load_bank

    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset) | {"device": "cpu"}
    base, cfg = backbone(preset, {})
    loaded = [load_bank(Path(b), base) for b in banks]
    mode = loaded[reference].model.mode
    size = preset["modes"][mode]
    tasks = args.tasks or list(loaded[reference].model.task_ids)
    data = load_mtl5(find_mtl5(args.data), tasks, size["per_class"], size["test_per_task"], preset["seed"])
    return loaded, mode, method_params(preset, "moecl", mode, cfg), tasks, data


def _agreement(args) -> None:
    a, b = Path(args.banks[0]), Path(args.banks[1])
    print(f"parameters, LoRA pairs as B @ A ({a} vs {b}): norms |A|, |B|, relative distance |A - B| / |A|")
    # each LoRA pair's B @ A once per bank: the norm and the distance both read it
    groups_a = {g: _effective(t) for g, t in parameter_groups(a).items()}
    groups_b = {g: _effective(t) for g, t in parameter_groups(b).items()}
    for group in sorted(set(groups_a) & set(groups_b)):
        ga, gb = groups_a[group], groups_b[group]
        distance = relative_distance(ga, gb)
        distance = "-" if distance is None else f"{distance:.4f}"
        print(f"  {group:<24} |A| {weight_norm(ga):9.4f}  |B| {weight_norm(gb):9.4f}  distance {distance}")
    if args.parameters_only:
        return
    loaded, mode, params, tasks, data = _kept(args, [a, b], 0)
    print(f"outputs on the {args.preset} preset's test records ({mode} mode)")
    for task_id in tasks:
        out = output_agreement(*loaded, task_id, data[task_id].test, params)
        print(
            f"  {task_id:<10} answers differ on {out['answers_differ']} of {out['records']}; label probabilities: "
            f"mean total variation {out['mean_tv_distance']:.4f}, max {out['max_tv_distance']:.4f}"
        )


def _routing(args) -> None:
    loaded, mode, params, tasks, data = _kept(args, args.banks, -1)  # the last bank knows every task
    print("beta_t, the gate's weight on the task's own expert (mean over layers [lowest, highest layer]),")
    print(f"over the real tokens of the {args.preset} preset's test prompts ({mode} mode)")
    print(f"{'task':<10} " + " ".join(f"{Path(b).name:>24}" for b in args.banks))
    for task_id in tasks:
        texts, length = [r.text for r in data[task_id].test], params.train.max_length
        cells = [
            format_share(summarise_share(dedicated_share(bank.model, bank.tokenizer, task_id, texts, length)))
            if task_id in bank.model.task_ids
            else "-"
            for bank in loaded
        ]
        print(f"{task_id:<10} " + " ".join(c.rjust(24) for c in cells))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.probes", description=__doc__.split("\n\n")[0])
    ap.add_argument("probe", choices=("agreement", "routing"))
    ap.add_argument(
        "banks", nargs="+", help="agreement: two banks; routing: moecl banks, e.g. one run's steps"
    )
    ap.add_argument("--parameters-only", action="store_true", help="agreement: the weights only (seconds)")
    ap.add_argument("--preset", default="cpu", help="whose test sampling and sizes to use (default cpu)")
    ap.add_argument("--tasks", nargs="+", help="tasks to probe (default: every task of the reference bank)")
    ap.add_argument("--data", help="the mtl5 folder (default $MOECL_MTL5, then ../shared/data/mtl5)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = ap.parse_args(argv)
    if args.probe == "agreement" and len(args.banks) != 2:
        ap.error("agreement compares two banks")
    (_agreement if args.probe == "agreement" else _routing)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

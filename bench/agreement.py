"""How far apart two banks of the same tasks are: in their parameters, their answers and their probabilities.

    python -m bench.agreement BANK_A BANK_B [--preset cpu] [--tasks dbpedia amazon] [--parameters-only]

Two methods can score the same accuracy because they learned the same thing, or because the test sample is
too small to show a difference. This tells the two apart for a pair of banks (e.g. `moecl` and `moecl_nogan`
after the same tasks, kept with `bench.run --workdir W --keep-banks`):
- parameters: per group both banks carry (shared expert, gates, discriminators, each dedicated expert), each
  bank's norm and the relative distance |a - b| / |a| over all its tensors, each LoRA pair taken as the
  weight change B @ A (so the norms say how large a change each expert makes);
- outputs, per task on the preset's test records: how many of the two banks' answers differ (greedy
  generation in instruction mode, the head's argmax in classifier mode), and the mean total-variation
  distance between their probabilities over the labels (option likelihood, or the head's softmax).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from moecl.bank import SHARED_FILE, read_manifest

_GROUP = re.compile(r"layers\.\d+\.(\w+)\.")


def parameter_groups(bank: Path) -> dict[str, dict[str, torch.Tensor]]:
    """group name -> {tensor name: tensor}: "shared", "gate", "discriminator" and "expert <task>"."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(bank / SHARED_FILE).items():
        match = _GROUP.match(name)
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
    diff = sum(float((a[k] - b[k]).pow(2).sum()) for k in common)
    norm = sum(float(a[k].pow(2).sum()) for k in common)
    return math.sqrt(diff / norm) if norm else None


def weight_norm(tensors: dict[str, torch.Tensor]) -> float:
    """Frobenius norm over a group's tensors, LoRA pairs as B @ A: how large a change the group makes."""
    return math.sqrt(sum(float(t.pow(2).sum()) for t in _effective(tensors).values()))


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def output_agreement(loaded_a, loaded_b, task_id: str, records, params) -> dict:
    """Answers that differ and the mean total-variation distance of the label probabilities on `records`.

    Classifier mode: one pass gives both (the head's argmax and softmax). Instruction mode: the answers come
    from greedy generation, which scores nothing, so the probabilities take a second, option-likelihood pass."""
    from moecl.evaluate import task_predictions

    banks = (loaded_a, loaded_b)
    preds = [task_predictions(m.model, m.tokenizer, task_id, records, params) for m in banks]
    if params.method.mode == "instruction":
        scoring = dataclasses.replace(
            params, evaluate=dataclasses.replace(params.evaluate, instruction_eval="likelihood")
        )
        scored = [task_predictions(m.model, m.tokenizer, task_id, records, scoring) for m in banks]
    else:
        scored = preds
    tv = [total_variation(p.scores, q.scores) for p, q in zip(*scored)]
    return {
        "records": len(records),
        "answers_differ": sum(p.label != q.label for p, q in zip(*preds)),
        "mean_tv_distance": sum(tv) / len(tv) if tv else None,
        "max_tv_distance": max(tv) if tv else None,
    }


def main(argv: list[str] | None = None) -> int:
    from bench.kept import add_arguments, load_kept_banks

    ap = argparse.ArgumentParser(prog="python -m bench.agreement", description=__doc__.split("\n\n")[0])
    ap.add_argument("bank_a")
    ap.add_argument("bank_b")
    add_arguments(ap)
    ap.add_argument(
        "--parameters-only", action="store_true", help="compare the weights only (seconds, no data)"
    )
    args = ap.parse_args(argv)
    bank_a, bank_b = Path(args.bank_a), Path(args.bank_b)

    print(
        f"parameters, LoRA pairs as B @ A ({bank_a} vs {bank_b}): norms |A|, |B|, relative distance |A - B| / |A|"
    )
    # each LoRA pair's B @ A once per bank: the norm and the distance both read it
    groups_a = {g: _effective(t) for g, t in parameter_groups(bank_a).items()}
    groups_b = {g: _effective(t) for g, t in parameter_groups(bank_b).items()}
    for group in sorted(set(groups_a) & set(groups_b)):
        distance = relative_distance(groups_a[group], groups_b[group])
        print(
            f"  {group:<24} |A| {weight_norm(groups_a[group]):9.4f}  |B| {weight_norm(groups_b[group]):9.4f}  "
            f"distance {'-' if distance is None else f'{distance:.4f}'}"
        )
    if args.parameters_only:
        return 0

    kept = load_kept_banks(args, [bank_a, bank_b])
    print(f"outputs on the {args.preset} preset's test records ({kept.mode} mode)")
    for task_id in kept.tasks:
        out = output_agreement(*kept.loaded, task_id, kept.data[task_id].test, kept.params)
        print(
            f"  {task_id:<10} answers differ on {out['answers_differ']} of {out['records']}; label probabilities: "
            f"mean total variation {out['mean_tv_distance']:.4f}, max {out['max_tv_distance']:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

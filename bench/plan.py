"""Which runs a benchmark makes, in which order, and how much work each is (for sizing a preset)."""

from __future__ import annotations

import math

from bench.variants import parse_variant


def plan_runs(
    methods: list[str], modes: list[str], orders: list[str], seeds: dict[str, list[int]] | None = None
) -> list[tuple[str, str | None, str, int]]:
    """(mode, order, method, seed): every row's first seed order by order, then the extra seeds, so that a run
    cut short loses repeats before it loses a row. The joint row (order-independent) runs once per mode and
    seed, with the first order. `seeds`: row -> its training seeds (default: 42 for every row)."""
    seeds = seeds or {}
    plan = []
    rounds = max((len(seeds.get(m, [42])) for m in methods), default=1)
    for r in range(rounds):
        for k, order in enumerate(orders):
            for mode in modes:
                for m in methods:
                    row_seeds = seeds.get(m, [42])
                    if r >= len(row_seeds):
                        continue
                    if parse_variant(m).joint:
                        if k == 0:
                            plan.append((mode, None, m, row_seeds[r]))
                    else:
                        plan.append((mode, order, m, row_seeds[r]))
    return plan


def describe_plan(preset, methods, modes, orders, tasks_by_mode, cost: bool = True) -> str:
    """The work of a run, to size a preset: optimisation steps and test predictions per run."""
    lines = [f"preset {preset.name}: {preset.description}"]
    plan = plan_runs(methods, modes, list(orders))
    for mode in modes:
        size, tasks = preset.modes[mode], tasks_by_mode[mode]
        per_task = {}
        for t in tasks.values():
            train = round(len(t.train) * (1 - size.dev_fraction))
            per_task[t.task_id] = (
                math.ceil(train / size.batch_size) * size.epochs,
                len(t.test),
                len(t.train) - train,
            )
        steps = sum(v[0] for v in per_task.values())
        n_order = len(next(iter(orders.values())))
        test = sum(v[1] for v in per_task.values()) / len(per_task)
        dev = sum(v[2] for v in per_task.values()) * size.epochs * size.evals_per_epoch
        predictions = round(test * (n_order * 2 + n_order - 1 + n_order)) + dev
        runs = sum(1 for m, *_ in plan if m == mode)
        lines.append(
            f"  {mode}: {runs} runs; per run about {steps} optimisation steps of {size.batch_size} x <= "
            f"{size.max_length} tokens and {predictions} predictions (test + dev)"
            + (" by greedy generation" if mode == "instruction" else "")
            + "; tasks: "
            + ", ".join(f"{k} {len(tasks[k].train)} train / {v[1]} test" for k, v in per_task.items())
        )
    if cost:
        c = preset.cost
        n = (len([m for m in methods if not parse_variant(m).joint]) or 2) * len(c.modes) + len(
            c.scaling_tasks
        ) * len(c.scaling_methods)
        lines.append(
            f"  cost: {n} models x {c.warmup + c.repeats} steps of {c.batch_size} x {c.seq_len} tokens"
        )
    return "\n".join(lines)

"""The one definition of the continual-learning metrics, used by evaluation, gates, flows, benchmarks and tests.

R[i][j] is the accuracy on task j after training the i-th task of the order (both 0-based here).
- ACC = mean_j R[T-1][j]
- BWT = mean_{i<T-1} (R[T-1][i] - R[i][i])                 (0 = no forgetting; negative = forgetting)
- FWT = mean_{i>=1} (R[i-1][i] - b_i), b_i = the untrained model's accuracy on task i
A matrix is stored as a list of rows, each a {task_id: accuracy} mapping of the tasks evaluated after that
step (so a row may hold only some tasks, e.g. when a benchmark evaluates just the cells the metrics need).

In production a known task can come back with a new data version, so `steps` (the task trained at each
step, repeats allowed) can be longer than `order` (distinct tasks, by first appearance). BWT then compares
each task's final accuracy with its accuracy right after the LAST step that trained it; on a classic stream
(no repeats) every definition above is the textbook one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return float("nan")
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def correctness(predictions: Sequence[str], references: Sequence[str]) -> str:
    """Which records were answered right, as a compact string: "1" right, "0" wrong, one per record.

    Kept so that two models scored on the same test sample can be compared record by record (see
    `paired_acc_difference`).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return "".join("1" if p == r else "0" for p, r in zip(predictions, references))


@dataclass(frozen=True)
class PairedDifference:
    """ACC(a) - ACC(b) from the same test records, with the standard error of that paired difference.

    `a_only` / `b_only`: records (all tasks together) that only a / only b got right; every other record
    counts the same for both and so carries no information about the difference.
    """

    diff: float
    se: float
    a_only: int
    b_only: int
    records: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "diff": round(self.diff, 6),
            "se": round(self.se, 6),
            "a_only": self.a_only,
            "b_only": self.b_only,
            "records": self.records,
        }


def paired_acc_difference(a: Mapping[str, str], b: Mapping[str, str]) -> PairedDifference:
    """The ACC difference of two models scored on the same records of the same tasks, paired per record.

    `a`, `b`: task -> `correctness` string. Per task j with n_j records and per-record differences
    d = a - b in {-1, 0, 1}: the accuracy difference is mean(d) and its variance var(d) / n_j (sample
    variance); ACC averages T tasks, so ACC(a) - ACC(b) = mean_j mean(d_j) with standard error
    sqrt(sum_j var(d_j) / n_j) / T. Pairing cancels the records both models get right or both get wrong,
    which makes this far smaller than the standard error of two independent accuracies.
    """
    tasks = sorted(a)
    if not tasks or sorted(b) != tasks:
        raise ValueError(f"paired comparison needs the same tasks on both sides: {sorted(a)} vs {sorted(b)}")
    diffs, variance, a_only, b_only, records = [], 0.0, 0, 0, 0
    for task in tasks:
        if len(a[task]) != len(b[task]) or not a[task]:
            raise ValueError(
                f"task {task!r}: {len(a[task])} vs {len(b[task])} records; pairing needs equal, non-empty"
            )
        d = [int(x) - int(y) for x, y in zip(a[task], b[task])]
        n = len(d)
        mean = sum(d) / n
        diffs.append(mean)
        variance += (sum((v - mean) ** 2 for v in d) / (n - 1) / n) if n > 1 else 0.0
        a_only += d.count(1)
        b_only += d.count(-1)
        records += n
    return PairedDifference(
        sum(diffs) / len(tasks), math.sqrt(variance) / len(tasks), a_only, b_only, records
    )


def mean_paired_difference(pairs: Sequence[PairedDifference]) -> dict[str, float | int | None]:
    """The mean of k paired differences, one per pair of runs (training seeds or task orders), with two standard
    errors of that mean: `se_test` = sqrt(sum se_i^2) / k counts test sampling only (the pairs' test records
    are sampled independently of each other's training noise); `se_seeds` = stdev(diff_i) / sqrt(k) is read off
    the pairs' own scatter, so it also counts what another training seed changes (None under two pairs)."""
    k, diffs = len(pairs), spread([p.diff for p in pairs])
    if not k:
        return {"mean": None, "se_test": None, "se_seeds": None, "n": 0}
    return {
        "mean": diffs["mean"],
        "se_test": round(math.sqrt(sum(p.se**2 for p in pairs)) / k, 6),
        "se_seeds": round(diffs["std"] / math.sqrt(k), 6) if k > 1 else None,
        "n": k,
    }


def pooled_paired_differences(pairs: Sequence[tuple[str, PairedDifference]]) -> dict[str, Any]:
    """Several paired differences of one reference (a) against one other row (b), a (label, difference) per pair
    of runs, pooled: the spread of the differences, their mean standard error, the records only the reference /
    only the other got right and all records (summed), each pair's own figure by label, and the mean over the
    pairs with both its standard errors (`mean_paired_difference`)."""
    return {
        "diff": spread([p.diff for _, p in pairs]),
        "se": spread([p.se for _, p in pairs])["mean"],
        "reference_only": sum(p.a_only for _, p in pairs),
        "other_only": sum(p.b_only for _, p in pairs),
        "records": sum(p.records for _, p in pairs),
        "orders": [label for label, _ in pairs],
        "by_run": {label: {"diff": p.diff, "se": p.se} for label, p in pairs},
        "over_runs": mean_paired_difference([p for _, p in pairs]),
    }


def acc_standard_error(per_task: Mapping[str, float | None], test_sizes: Mapping[str, int]) -> float | None:
    """The standard error of ACC that sampling the test records alone implies: each task's accuracy is a
    binomial proportion p_j over n_j records, so SE = sqrt(sum_j p_j (1 - p_j) / n_j) / T. None where a
    task's test size is unknown (no figure rather than a wrong one)."""
    cells = [(p, test_sizes.get(t)) for t, p in (per_task or {}).items() if p is not None]
    if not cells or any(not n for _, n in cells):
        return None
    return round(math.sqrt(sum(p * (1 - p) / n for p, n in cells)) / len(cells), 6)


def spread(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation (None for one value), min, max and count of the values (None skipped)."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": round(statistics.fmean(kept), 6),
        "std": round(statistics.stdev(kept), 6) if len(kept) > 1 else None,
        "min": round(min(kept), 6),
        "max": round(max(kept), 6),
        "n": len(kept),
    }


def normalize_answer(text: str) -> str:
    """Normalised exact match as O-LoRA/MoCL score generations: lower case, no punctuation, one space."""
    import re

    text = text.strip().lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


@dataclass
class ContinualMetrics:
    order: list[str]
    matrix: list[dict[str, float]]
    before_training: dict[str, float] = field(default_factory=dict)
    zero_shot: dict[str, float] = field(default_factory=dict)
    steps: list[str] | None = None

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = list(self.order[: len(self.matrix)])

    @property
    def final(self) -> dict[str, float]:
        return dict(self.matrix[-1]) if self.matrix else {}

    @property
    def acc(self) -> float:
        return acc(self.matrix, self.order)

    @property
    def bwt(self) -> float:
        return bwt(self.matrix, self.steps)

    @property
    def fwt(self) -> float:
        return fwt(self.order, self.before_training, self.zero_shot)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContinualMetrics:
        """Back from as_dict's shape (metrics/cl.json, a registry record's metrics)."""
        order = list(data["order"])
        return cls(
            order=order,
            matrix=[{t: v for t, v in zip(order, row) if v is not None} for row in data["matrix"]],
            before_training=dict(data.get("before_training") or {}),
            zero_shot=dict(data.get("zero_shot") or {}),
            steps=data.get("steps"),
        )

    def as_dict(self) -> dict:
        """The shape of metrics/cl.json."""
        return {
            "acc": json_number(self.acc),
            "bwt": json_number(self.bwt),
            "fwt": json_number(self.fwt),
            "per_task": {t: json_number(v) for t, v in self.final.items()},
            "order": list(self.order),
            "steps": list(self.steps),
            "matrix": [[json_number(row.get(t)) for t in self.order] for row in self.matrix],
            "before_training": {t: json_number(v) for t, v in self.before_training.items()},
            "zero_shot": {t: json_number(v) for t, v in self.zero_shot.items()},
        }


def json_number(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), 6)


def acc(matrix: Sequence[Mapping[str, float]], order: Sequence[str]) -> float:
    """Mean final accuracy over the tasks learned so far."""
    if not matrix:
        return float("nan")
    last = matrix[-1]
    return _mean([last.get(t) for t in order if t in last])


def _last_learned(steps: Sequence[str]) -> dict[str, int]:
    return {task: i for i, task in enumerate(steps)}


def bwt(matrix: Sequence[Mapping[str, float]], steps: Sequence[str]) -> float:
    """`steps[i]` is the task trained at step i (for a classic stream: the task order)."""
    n = len(matrix)
    if n < 2:
        return 0.0 if n == 1 else float("nan")
    last = matrix[-1]
    final_task = steps[n - 1]
    diffs = []
    for task, i in _last_learned(steps[:n]).items():
        if task != final_task and task in last and task in matrix[i]:
            diffs.append(last[task] - matrix[i][task])
    return _mean(diffs) if diffs else 0.0


def fwt(order: Sequence[str], before_training: Mapping[str, float], zero_shot: Mapping[str, float]) -> float:
    """before_training[t] = R[i-1][i] (the model just before training t); zero_shot[t] = b_t."""
    diffs = [before_training[t] - zero_shot[t] for t in order[1:] if t in before_training and t in zero_shot]
    return _mean(diffs)


def forgetting_per_task(matrix: Sequence[Mapping[str, float]], steps: Sequence[str]) -> dict[str, float]:
    """Final accuracy minus the accuracy right after the task was (last) learned (negative = forgotten)."""
    if not matrix:
        return {}
    last = matrix[-1]
    learned = _last_learned(steps[: len(matrix)])
    return {t: last[t] - matrix[i][t] for t, i in learned.items() if t in last and t in matrix[i]}


def label_stripping_rate(scores: Sequence[float], is_label: Sequence[bool], precision_target: float) -> float:
    """For one label: the largest share of items whose score (the model's probability of that label) is
    >= a threshold t, over every t, while the precision of those automatic decisions stays >= the target.
    A threshold cut takes every item scored at or above it, so items with equal scores stand or fall together."""
    if len(scores) != len(is_label):
        raise ValueError("scores and labels differ in length")
    n = len(scores)
    if n == 0:
        return float("nan")
    ranked = sorted(zip(scores, is_label), key=lambda pair: -pair[0])
    best, hits = 0, 0
    for k, (score, hit) in enumerate(ranked, start=1):
        hits += bool(hit)
        at_cut = k == n or ranked[k][0] < score  # the last item scored >= this threshold
        if at_cut and hits / k >= precision_target:
            best = k
    return best / n


def stripping_rate(
    scores: Sequence[float], is_positive: Sequence[bool], precision_target: float = 0.9
) -> float:
    """The paper's industrial metric for a binary compliance task, computed as its reference code does.

    For each label, the share of items decided automatically as that label by a >= threshold on the model's
    probability of it, at precision >= precision_target (`label_stripping_rate`); the stripping rate is the
    sum over both labels (`scores`: the probability of the positive label; the negative's is 1 - it).
    """
    positive = label_stripping_rate(scores, is_positive, precision_target)
    negative = label_stripping_rate([1.0 - s for s in scores], [not p for p in is_positive], precision_target)
    return positive + negative


# Comparing runs. A run is a dict as the benchmark stores one (bench/runs.py): "method" (the row), "mode", "order"
# ("joint" for one run on every task at once), "seed" (42 where absent), "acc", "bwt", "fwt", "metrics"
# (ContinualMetrics.as_dict()) and "correct" (task -> the final model's per-record marks, `correctness`).


def run_seed(run: Mapping[str, Any]) -> int:
    """A run's training seed (42 for runs stored before the seed was recorded)."""
    return run.get("seed", 42)


def run_label(run: Mapping[str, Any]) -> str:
    """`order/seed` of a run, e.g. `order1/s42`: how the comparisons name a pair of runs."""
    return f"{run['order']}/s{run_seed(run)}"


def _ranked(items: Mapping[str, Any], rows: Sequence[str] | None) -> list[tuple[str, Any]]:
    """`items` (row -> value) in the order of `rows`, the rest last by name."""
    rank = list(rows or ())
    return sorted(items.items(), key=lambda kv: (rank.index(kv[0]) if kv[0] in rank else len(rank), kv[0]))


def summarise_runs(
    runs: Sequence[Mapping[str, Any]], test_sizes: Mapping[str, Mapping[str, int]] | None = None, rows=None
) -> dict[str, dict[str, Any]]:
    """mode -> row -> {acc, bwt, fwt: `spread` over the row's runs (orders and seeds); acc_se: ACC's test-sampling
    standard error (`acc_standard_error`), mean over the runs; orders, runs: each run's order and `run_label`}.
    `test_sizes`: mode -> task -> test records; rows in the order of `rows`."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(run["mode"], {}).setdefault(run["method"], []).append(run)
    out: dict = {}
    for mode, by_row in groups.items():
        sizes = (test_sizes or {}).get(mode) or {}
        for row, group in _ranked(by_row, rows):
            summary = {k: spread([r[k] for r in group]) for k in ("acc", "bwt", "fwt")}
            se = [acc_standard_error(r["metrics"].get("per_task"), sizes) for r in group]
            summary |= {"acc_se": spread(se)["mean"], "orders": [r["order"] for r in group]}
            out.setdefault(mode, {})[row] = summary | {"runs": [run_label(r) for r in group]}
    return out


def _pairs_with(ref: Mapping[str, Any], run: Mapping[str, Any]) -> bool:
    """Same mode, order (or either is a joint run) and seed: another seed's run would mix training-seed noise in."""
    same_order = "joint" in (ref["order"], run["order"]) or run["order"] == ref["order"]
    return run["mode"] == ref["mode"] and same_order and run_seed(run) == run_seed(ref)


def paired_comparisons(
    runs: Sequence[Mapping[str, Any]], references: Sequence[str], rows=None
) -> dict[str, Any]:
    """reference row -> mode -> other row -> ACC(reference) - ACC(other), paired record by record, for each of
    `references` that ran; other rows in the order of `rows`.

    Each reference run pairs with the other row's run of the same order and seed (a joint run with every order:
    a joint reference, such as the upper bound mtl, pairs with the other row's run on each order, labelled by
    that run; a reference run whose seed the other row lacks stays unpaired), pooled by
    `pooled_paired_differences`. Runs without per-record marks are left out."""
    marked = [r for r in runs if r.get("correct")]
    present = {r["method"] for r in marked}
    out: dict = {}
    for reference in [m for m in references if m in present]:
        table: dict = {}
        for ref in (r for r in marked if r["method"] == reference):
            for other in sorted(present - {reference}):
                for partner in (r for r in marked if r["method"] == other and _pairs_with(ref, r)):
                    pair = paired_acc_difference(ref["correct"], partner["correct"])
                    where = run_label(partner if ref["order"] == "joint" else ref)  # its continual run
                    table.setdefault(ref["mode"], {}).setdefault(other, []).append((where, pair))
        out[reference] = {
            mode: {o: pooled_paired_differences(p) for o, p in _ranked(others, rows)}
            for mode, others in table.items()
        }
    return out


def instrument_check(runs: Sequence[Mapping[str, Any]], upper: str = "mtl", lower: str = "seq_lora") -> dict:
    """Can a benchmark see a gap as large as the one a method claims? mode -> ACC(upper) - ACC(lower), paired on
    the same records: the first seed's pair (diff, paired standard error, ratio) and, where more seeds ran both
    rows, their mean over seeds (`mean_paired_difference`)."""
    out = {}
    for mode in sorted({r["mode"] for r in runs}):
        by_seed: dict = {}
        for r in runs:
            if r["mode"] == mode and r.get("correct") and r["method"] in (upper, lower):
                by_seed.setdefault(run_seed(r), {}).setdefault(r["method"], r)
        pairs = [
            paired_acc_difference(b[upper]["correct"], b[lower]["correct"])
            for b in by_seed.values()
            if len(b) == 2
        ]
        if pairs:
            first = pairs[0]
            out[mode] = {
                "diff": first.diff,
                "se": first.se,
                "ratio": first.diff / first.se if first.se else None,
            }
            out[mode]["over_runs"] = mean_paired_difference(pairs)
    return out

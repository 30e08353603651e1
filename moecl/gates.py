"""The promotion gate: may a challenger bank replace the champion?

Each check_* function is pure: plain inputs in, a list of Check out. decide() combines them: the challenger
is promoted only when every check passed. GateDecision.to_dict() is the shape of metrics/gate.json.

Check names: "forgetting[<task>]", "bwt", "new_task_accuracy", "canary_agreement",
"canary_agreement[<task>]", "confidence_ks", "data_drift". A reason is "<name without [task]>: <detail>",
e.g. "forgetting: task 'agnews' dropped 0.12 below the champion (0.81 -> 0.69), allowed 0.05".
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from moecl.config import GateConfig
from moecl.metrics import ContinualMetrics

if TYPE_CHECKING:
    from moecl.drift import DataDriftResult

# Float slack for "at least / at most" comparisons, so 0.75 - 0.70 == 0.05 is not a failure at max 0.05.
EPS = 1e-9

# One canary prediction: (task_id, predicted label, confidence in [0, 1]).
Prediction = tuple[str, str, float]


@dataclass
class Check:
    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str

    @property
    def group(self) -> str:
        """The check's family: "forgetting[agnews]" -> "forgetting"."""
        return self.name.split("[", 1)[0]

    @property
    def reason(self) -> str:
        return f"{self.group}: {self.detail}"


@dataclass
class GateDecision:
    decision: str  # "promote" | "reject"
    checks: list[Check] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def promoted(self) -> bool:
        return self.decision == "promote"

    def to_dict(self) -> dict[str, Any]:
        """The shape of metrics/gate.json (numbers rounded, NaN as null)."""
        return {
            "decision": self.decision,
            "reasons": list(self.reasons),
            "checks": [
                {**asdict(c), "value": _round(c.value), "threshold": _round(c.threshold)} for c in self.checks
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateDecision:
        keys = ("name", "passed", "value", "threshold", "detail")
        checks = [Check(**{k: c.get(k) for k in keys}) for c in data["checks"]]
        return cls(decision=data["decision"], checks=checks, reasons=list(data.get("reasons", [])))


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 6)


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def decide(checks: Sequence[Check]) -> GateDecision:
    """Promote iff there is at least one check and all passed; the reasons name each failure and its numbers."""
    checks = list(checks)
    if not checks:
        return GateDecision("reject", [], ["no checks were run: refusing to promote blind"])
    failed = [c for c in checks if not c.passed]
    if failed:
        return GateDecision("reject", checks, [c.reason for c in failed])
    return GateDecision("promote", checks, [f"all {len(checks)} checks passed"])


# --- forgetting -------------------------------------------------------------------------------------------


def check_forgetting(
    challenger: ContinualMetrics,
    champion_final: Mapping[str, float] | None,
    new_task: str,
    gate_cfg: GateConfig,
) -> list[Check]:
    """Per earlier task: challenger accuracy >= champion accuracy - max_task_drop; BWT >= min_bwt; the new
    task's accuracy >= min_new_task_accuracy. With no champion (the first bank) only the last two apply."""
    final = challenger.final
    checks = [
        _task_drop_check(task, before, final.get(task), gate_cfg.max_task_drop)
        for task, before in (champion_final or {}).items()
        if task != new_task  # a new version of this task is scored on new test data: not comparable
    ]

    bwt, min_bwt = challenger.bwt, gate_cfg.min_bwt
    if _missing(bwt):
        checks.append(Check("bwt", False, None, min_bwt, "BWT is undefined (empty accuracy matrix)"))
    else:
        detail = f"BWT {bwt:+.3f}, required >= {min_bwt:+.3f}"
        checks.append(Check("bwt", bwt >= min_bwt - EPS, bwt, min_bwt, detail))

    new_acc, floor = final.get(new_task), gate_cfg.min_new_task_accuracy
    if _missing(new_acc):
        detail = f"new task {new_task!r} was not evaluated"
        checks.append(Check("new_task_accuracy", False, None, floor, detail))
    else:
        detail = f"new task {new_task!r} accuracy {new_acc:.2f}, required >= {floor:.2f}"
        checks.append(Check("new_task_accuracy", new_acc >= floor - EPS, new_acc, floor, detail))
    return checks


def _task_drop_check(task: str, before: float | None, after: float | None, allowed: float) -> Check:
    name = f"forgetting[{task}]"
    if _missing(before):
        return Check(
            name, True, None, allowed, f"task {task!r}: the champion has no accuracy to compare with"
        )
    if _missing(after):
        detail = f"task {task!r} was not evaluated for the challenger (champion {before:.2f})"
        return Check(name, False, None, allowed, detail)
    drop = before - after
    change = f"dropped {drop:.2f} below the champion" if drop > 0 else f"held vs the champion ({-drop:+.2f})"
    detail = f"task {task!r} {change} ({before:.2f} -> {after:.2f}), allowed {allowed:.2f}"
    return Check(name, drop <= allowed + EPS, drop, allowed, detail)


# --- behaviour on canary inputs ---------------------------------------------------------------------------


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    if not a or not b:
        return float("nan")
    xs, ys = sorted(a), sorted(b)
    gap = 0.0
    for v in set(xs) | set(ys):  # the CDFs only change at sample values
        gap = max(gap, abs(bisect.bisect_right(xs, v) / len(xs) - bisect.bisect_right(ys, v) / len(ys)))
    return gap


def confidence_ks(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None]:
    """(KS statistic, p-value or None). scipy is only a transitive dependency here, so fall back to our own."""
    try:
        from scipy.stats import ks_2samp
    except ImportError:
        return ks_statistic(a, b), None
    if not a or not b:
        return float("nan"), None
    result = ks_2samp(list(a), list(b))
    return float(result.statistic), float(result.pvalue)


def _validate_predictions(champion: Sequence[Prediction], challenger: Sequence[Prediction]) -> None:
    if len(champion) != len(challenger):
        raise ValueError(f"{len(champion)} champion canary predictions vs {len(challenger)} challenger ones")
    for i, ((t1, _, c1), (t2, _, c2)) in enumerate(zip(champion, challenger)):
        if t1 != t2:
            raise ValueError(f"canary {i}: task {t1!r} for the champion vs {t2!r} for the challenger")
        for who, conf in (("champion", c1), ("challenger", c2)):
            if not 0.0 <= conf <= 1.0:
                raise ValueError(f"canary {i}: {who} confidence {conf!r} is outside [0, 1]")


def _agreement_check(
    name: str, where: str, pairs: list[tuple[Prediction, Prediction]], floor: float
) -> Check:
    agree = sum(a[1] == b[1] for a, b in pairs)
    rate = agree / len(pairs)
    detail = f"{where} challenger agrees with the champion on {agree}/{len(pairs)} canaries ({rate:.2f}), required >= {floor:.2f}"
    return Check(name, rate >= floor - EPS, rate, floor, detail)


def check_behaviour(
    champion_preds: Sequence[Prediction],
    challenger_preds: Sequence[Prediction],
    gate_cfg: GateConfig,
) -> list[Check]:
    """Champion vs challenger on the same canary inputs of earlier tasks, item by item (same order):
    label agreement overall and per task, and the KS statistic between the two confidence distributions."""
    _validate_predictions(champion_preds, challenger_preds)
    floor = gate_cfg.min_canary_agreement
    if not champion_preds:
        detail = "no canary inputs (no earlier tasks): nothing to compare"
        return [Check("canary_agreement", True, None, floor, detail)]
    pairs = list(zip(champion_preds, challenger_preds))
    checks = [_agreement_check("canary_agreement", "overall:", pairs, floor)]
    by_task: dict[str, list[tuple[Prediction, Prediction]]] = {}
    for pair in pairs:
        by_task.setdefault(pair[0][0], []).append(pair)
    for task, task_pairs in by_task.items():
        checks.append(_agreement_check(f"canary_agreement[{task}]", f"task {task!r}:", task_pairs, floor))

    stat, p = confidence_ks([c for _, _, c in champion_preds], [c for _, _, c in challenger_preds])
    limit = gate_cfg.max_confidence_ks
    p_text = f", p={p:.3g}" if p is not None else ""
    detail = f"confidence distribution shift KS={stat:.2f}{p_text} over {len(pairs)} canaries, allowed <= {limit:.2f}"
    checks.append(Check("confidence_ks", stat <= limit + EPS, stat, limit, detail))
    return checks


# --- data drift -------------------------------------------------------------------------------------------


def check_data_drift(result: DataDriftResult | None, gate_cfg: GateConfig) -> list[Check]:
    """Gate on data drift only for a new version of a known task, and only if gate.gate_on_data_drift."""
    if result is None:
        return [Check("data_drift", True, None, None, "no drift result (new task): not gated")]
    threshold = result.max_drift_share
    if not result.has_reference:
        note = result.note or "no previous version"
        return [Check("data_drift", True, None, None, f"task {result.task_id!r}: {note}; not gated")]
    drifted_cols = [name for name, col in result.columns.items() if col.get("drifted")]
    summary = (
        f"task {result.task_id!r}: {len(drifted_cols)} of {len(result.columns)} columns drifted "
        f"(share {result.drift_share:.2f}, allowed {threshold:.2f})"
    )
    if drifted_cols:
        summary += ": " + ", ".join(_describe_column(n, result.columns[n]) for n in drifted_cols)
    if not gate_cfg.gate_on_data_drift:
        summary += "; not gated (gate.gate_on_data_drift=false)"
        return [Check("data_drift", True, result.drift_share, threshold, summary)]
    return [Check("data_drift", not result.drifted, result.drift_share, threshold, summary)]


def _describe_column(name: str, column: Mapping[str, Any]) -> str:
    score = column.get("score")
    score_text = f"{score:.3g}" if isinstance(score, (int, float)) else "?"
    return f"{name} ({column.get('method') or '?'} {score_text})"

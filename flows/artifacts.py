"""What a self-evolution run shows people: pure builders from outcomes and metrics dicts to markdown and rows.

No Prefect here: flows/self_evolve.py hands these strings and rows to `prefect.artifacts`, and `moecl history`
reads the run record back. Every artifact key is stable (lowercase, digits, dashes), so the versions of one key
line up run after run in the UI.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

KEY_SUMMARY = "moecl-summary"
KEY_MATRIX = "moecl-accuracy-matrix"
KEY_PER_TASK = "moecl-per-task-accuracy"
KEY_DRIFT_REPORT = "moecl-drift-report"
KEY_BANK = "moecl-bank"
KEY_RECORD = "moecl-run-record"  # one row per dataset-version run: what `moecl history` reads back
KEY_BATCH = "moecl-evolve-batch"
KEYS = (KEY_SUMMARY, KEY_MATRIX, KEY_PER_TASK, KEY_DRIFT_REPORT, KEY_BANK, KEY_RECORD, KEY_BATCH)

RECORD_FIELDS = (
    "task_id",
    "data_version",
    "decision",
    "version",
    "acc",
    "bwt",
    "fwt",
    "champion_before",
    "champion_after",
    "reasons",
)

_KEY_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

# The name of the state a dataset version's flow run ends in, after its decision: a rejected version must not
# look like a promoted one in the UI's run list. The state type stays Completed (Failed for invalid data).
DECISION_STATES = {
    "promote": "Promoted",
    "reject": "Rejected",
    "skipped": "Skipped",
    "superseded": "Superseded",
    "invalid": "Invalid data",
}
STATE_MESSAGE_CHARS = 500


def decision_state_name(decision: str | None) -> str:
    """'reject' -> 'Rejected': the state name of a run that decided `decision`."""
    if not decision:
        return "?"
    return DECISION_STATES.get(decision, decision.replace("_", " ").capitalize())


def decision_message(reasons: list[str] | str | None) -> str:
    """The state message: the reasons of the decision, as `moecl history` shows them."""
    text = reasons if isinstance(reasons, str) else "; ".join(reasons or [])
    text = text.strip() or "(no reason given)"
    return text if len(text) <= STATE_MESSAGE_CHARS else text[: STATE_MESSAGE_CHARS - 3] + "..."


def valid_key(key: str) -> bool:
    return bool(_KEY_RE.match(key))


def short(data_version: str | None, n: int = 10) -> str:
    return (data_version or "?")[:n]


def number(value: Any, signed: bool = False) -> str:
    """A metric for people: 3 decimals, n/a for None/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def file_uri(path: str | Path) -> str:
    return Path(path).resolve().as_uri()


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# --- one dataset version --------------------------------------------------------------------------------------
def summary_markdown(outcome: dict[str, Any]) -> str:
    """Task, data version, decision and why, ACC/BWT/FWT, champion before -> after."""
    decision = outcome.get("decision", "?")
    metrics = outcome.get("metrics") or {}
    lines = [
        f"# {outcome.get('task_id')}@{short(outcome.get('data_version'))}: {decision.upper()}",
        "",
        "| | |",
        "|---|---|",
        f"| task | `{outcome.get('task_id')}` |",
        f"| data version | `{outcome.get('data_version')}` |",
        f"| decision | **{decision}** |",
        f"| challenger | {outcome.get('version') or 'none'} |",
        f"| champion | {outcome.get('champion_before') or 'none'} -> {outcome.get('champion_after') or 'none'} |",
    ]
    if metrics:
        lines.append(
            f"| ACC / BWT / FWT | {number(metrics.get('acc'))} / {number(metrics.get('bwt'), True)} / "
            f"{number(metrics.get('fwt'), True)} |"
        )
    lines += ["", "## Why", ""]
    lines += [f"- {_md_cell(r)}" for r in outcome.get("reasons") or ["(no reason given)"]]
    checks = (outcome.get("gate") or {}).get("checks") or []
    if checks:
        lines += [
            "",
            "## Gate checks",
            "",
            "| check | passed | value | threshold | detail |",
            "|---|---|---|---|---|",
        ]
        for c in checks:
            lines.append(
                f"| {_md_cell(c.get('name'))} | {'yes' if c.get('passed') else '**no**'} | "
                f"{number(c.get('value'))} | {number(c.get('threshold'))} | {_md_cell(c.get('detail') or '')} |"
            )
    drift = outcome.get("drift")
    if drift:
        lines += ["", "## Data drift", ""]
        if drift.get("has_reference", True):
            lines.append(
                f"drifted: **{'yes' if drift.get('drifted') else 'no'}**, drift share "
                f"{number(drift.get('drift_share'))} (max {number(drift.get('max_drift_share'))}), "
                f"{drift.get('reference_rows', 0)} -> {drift.get('current_rows', 0)} rows"
            )
        else:
            lines.append(
                "a new task: described, not gated on drift"
                + (f" ({drift['note']})" if drift.get("note") else "")
            )
    return "\n".join(lines) + "\n"


def invalid_markdown(task_id: str, data_version: str | None, message: str) -> str:
    """The summary of a version whose data failed validation: nothing was trained or registered."""
    return "\n".join(
        [
            f"# {task_id}@{short(data_version)}: INVALID DATA",
            "",
            f"The dataset version `{data_version}` of task `{task_id}` failed validation. Nothing was trained, "
            "the champion and the registry are untouched. Fix the data and land a new version.",
            "",
            "```",
            message.strip(),
            "```",
            "",
        ]
    )


def superseded_markdown(task_id: str, requested: str, current: str) -> str:
    return (
        f"# {task_id}@{short(requested)}: SUPERSEDED\n\nThe workspace now holds version `{current}` of task "
        f"`{task_id}`, not the requested `{requested}`; the newer version is processed by its own run.\n"
    )


def matrix_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The accuracy matrix: one row per CL step (the task trained at it), one column per task."""
    order = list(metrics.get("order") or [])
    steps = list(metrics.get("steps") or order)
    rows = []
    for i, values in enumerate(metrics.get("matrix") or []):
        row: dict[str, Any] = {"after step": f"{i + 1}. {steps[i] if i < len(steps) else '?'}"}
        for task, value in zip(order, values):
            row[task] = None if value is None else round(float(value), 4)
        rows.append(row)
    return rows


def per_task_rows(metrics: dict[str, Any], champion_per_task: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Final per-task accuracy of the challenger against the champion's (delta = challenger - champion)."""
    champion_per_task = champion_per_task or {}
    rows = []
    for task, value in (metrics.get("per_task") or {}).items():
        before = champion_per_task.get(task)
        delta = None if value is None or before is None else round(float(value) - float(before), 4)
        rows.append({"task": task, "challenger": value, "champion": before, "delta": delta})
    return rows


def run_record(outcome: dict[str, Any]) -> dict[str, Any]:
    """The one-row record `moecl history` reads back (also a readable table artifact)."""
    metrics = outcome.get("metrics") or {}
    return {
        "task_id": outcome.get("task_id"),
        "data_version": outcome.get("data_version"),
        "decision": outcome.get("decision"),
        "version": outcome.get("version"),
        "acc": metrics.get("acc"),
        "bwt": metrics.get("bwt"),
        "fwt": metrics.get("fwt"),
        "champion_before": outcome.get("champion_before"),
        "champion_after": outcome.get("champion_after"),
        "reasons": "; ".join(outcome.get("reasons") or []),
    }


def batch_markdown(results: list[dict[str, Any]]) -> str:
    """The parent run's summary: each dataset version it handled, in landing order."""
    if not results:
        return "# self-evolve: nothing pending\n\nNo task folder holds a dataset version that was not processed.\n"
    lines = [
        "# self-evolve",
        "",
        "| task | data version | run state | decision | champion |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.get('task_id')} | `{short(r.get('data_version'))}` | {r.get('state')} | "
            f"{r.get('decision') or '-'} | {r.get('champion_before') or 'none'} -> "
            f"{r.get('champion_after') or r.get('champion_before') or 'none'} |"
        )
    return "\n".join(lines) + "\n"


# --- history (read back) ----------------------------------------------------------------------------------------
def history_row(run: dict[str, Any], record: dict[str, Any] | None) -> dict[str, Any]:
    """Join a flow run (when, state, parameters) with its run record (decision, metrics, champions)."""
    record = record or {}
    params = run.get("parameters") or {}
    return {
        "when": run.get("start_time") or run.get("expected_start_time"),
        "run": run.get("name"),
        "flow_run_id": run.get("id"),
        "state": run.get("state"),
        "task_id": record.get("task_id") or params.get("task_id"),
        "data_version": record.get("data_version") or params.get("data_version"),
        "decision": record.get("decision"),
        "version": record.get("version"),
        "acc": record.get("acc"),
        "bwt": record.get("bwt"),
        "champion_before": record.get("champion_before"),
        "champion_after": record.get("champion_after"),
        "reasons": record.get("reasons") or run.get("state_message"),
    }


def _row_state(r: dict[str, Any]) -> str:
    """The run's state name; a run from before the decision names (state "Completed") shows its decision's."""
    state, decision = r.get("state"), r.get("decision")
    if decision and (state in (None, "Completed") or (state == "Failed" and decision == "invalid")):
        return decision_state_name(decision)
    return state or "?"


def format_history(rows: list[dict[str, Any]], why_chars: int = 100) -> str:
    header = ("when", "task", "version", "state", "ACC", "BWT", "champion", "why")
    table = [header]
    for r in rows:
        when = (r.get("when") or "")[:19].replace("T", " ")
        champion = f"{r.get('champion_before') or 'none'} -> {r.get('champion_after') or r.get('champion_before') or 'none'}"
        if not r.get("decision"):
            champion = "-"
        why = " ".join(str(r.get("reasons") or "").split())
        if len(why) > why_chars:
            why = why[: why_chars - 3] + "..."
        table.append(
            (
                when,
                r.get("task_id") or "?",
                short(r.get("data_version")),
                _row_state(r),
                number(r.get("acc")) if r.get("acc") is not None else "-",
                number(r.get("bwt"), True) if r.get("bwt") is not None else "-",
                champion,
                why or "-",
            )
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)

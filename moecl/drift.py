"""Data drift of a new version of a KNOWN task against its previous version, with Evidently.

A new task is supposed to differ from earlier tasks, so it is never gated on drift: describe_new_task only
writes a descriptive report. Each record becomes one row: text, label (categorical), text_length (characters)
and oov_share (share of the record's words missing from the previous version's vocabulary). Evidently is
imported lazily (it costs ~5 s to import).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moecl.config import DriftConfig
from moecl.data.task import Record, TaskData
from moecl.errors import MoeclError
from moecl.io import atomic_path

if TYPE_CHECKING:
    import pandas as pd

NUMERIC_COLUMNS = ("text_length", "oov_share")
_WORD = re.compile(r"\w+")


class DriftError(MoeclError):
    """Drift cannot be computed for these inputs (empty version, mismatched task ids)."""


@dataclass
class DataDriftResult:
    task_id: str
    drifted: bool
    drift_share: float
    columns: dict[str, dict[str, Any]]  # name -> {"drifted": bool, "score": float, "method": str}
    report_path: str | None
    max_drift_share: float = 0.5
    has_reference: bool = True  # False for a new task: nothing to compare with, never gated
    note: str = ""
    reference_rows: int = 0
    current_rows: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- frames -----------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def document_frequency(texts: Iterable[str]) -> Counter:
    """How many texts each word occurs in."""
    df: Counter = Counter()
    for text in texts:
        df.update(set(words(text)))
    return df


def oov_shares(
    texts: Sequence[str], reference_df: Mapping[str, int], *, leave_one_out: bool = False
) -> list[float]:
    """Per text: the share of its words absent from the reference vocabulary.

    leave_one_out=True is for the reference texts themselves: a word counts as out of vocabulary when no
    OTHER reference text has it, so reference and current rows are measured the same way (a reference row
    scored against a vocabulary that includes itself would always be 0 and look like drift).
    """
    floor = 1 if leave_one_out else 0
    shares = []
    for text in texts:
        tokens = words(text)
        missing = sum(reference_df.get(w, 0) <= floor for w in tokens)
        shares.append(missing / len(tokens) if tokens else 0.0)
    return shares


def task_records(task: TaskData) -> list[Record]:
    """All records of a version (train, dev, test): drift is about the data the version ships."""
    return [*task.train, *(task.dev or []), *task.test]


def records_frame(
    records: Sequence[Record], reference_df: Mapping[str, int], *, leave_one_out: bool = False
) -> pd.DataFrame:
    import pandas as pd

    texts = [r.text for r in records]
    return pd.DataFrame(
        {
            "text": texts,
            "label": [str(r.label) for r in records],
            "text_length": [float(len(t)) for t in texts],
            # Evidently's own OOV descriptor downloads NLTK word lists (no network here), so we count ourselves.
            "oov_share": oov_shares(texts, reference_df, leave_one_out=leave_one_out),
        }
    )


def drift_frames(previous: Sequence[Record], current: Sequence[Record]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reference, current) frames; both measure OOV against the previous version's vocabulary."""
    reference_df = document_frequency(r.text for r in previous)
    return (
        records_frame(previous, reference_df, leave_one_out=True),
        records_frame(current, reference_df),
    )


def _evidently_dataset(frame: pd.DataFrame, include_text: bool):
    from evidently import DataDefinition, Dataset

    definition = DataDefinition(
        text_columns=["text"] if include_text else [],
        categorical_columns=["label"],
        numerical_columns=list(NUMERIC_COLUMNS),
    )
    data = frame if include_text else frame.drop(columns=["text"])
    return Dataset.from_pandas(data, data_definition=definition)


# --- reading Evidently's snapshot -------------------------------------------------------------------------


def _number(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return out


def _fallback_drifted(method: str, score: float, threshold: float) -> bool:
    """Only used if a column has no test result: p-value methods drift below the threshold, distances above."""
    if math.isnan(score) or math.isnan(threshold):
        return False
    return score < threshold if "p_value" in method else score >= threshold


def extract_drift(snapshot: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], float | None]:
    """From `snapshot.dict()` of a DataDriftPreset report: per-column drift and the preset's drifted share.

    Per column, the ValueDrift metric gives the score, method and threshold; its test (when the report was
    run with include_tests=True) says whether Evidently called it drift. Unknown entries are skipped.
    """
    metrics = {m.get("id"): m for m in snapshot.get("metrics", []) if isinstance(m, Mapping)}
    status_by_metric: dict[Any, str] = {}
    for test in snapshot.get("tests", []):
        if isinstance(test, Mapping):
            metric_id = (test.get("metric_config") or {}).get("metric_id")
            status_by_metric[metric_id] = str(test.get("status", "")).upper()

    columns: dict[str, dict[str, Any]] = {}
    share: float | None = None
    for metric_id, metric in metrics.items():
        config = metric.get("config") or {}
        kind = str(config.get("type", ""))
        if kind.endswith("ValueDrift") and config.get("column"):
            method = str(config.get("method") or "")
            score = _number(metric.get("value"))
            threshold = _number(config.get("threshold"))
            status = status_by_metric.get(metric_id)
            if status in ("FAIL", "WARNING"):
                drifted = True
            elif status == "SUCCESS":
                drifted = False
            else:
                drifted = _fallback_drifted(method, score, threshold)
            columns[str(config["column"])] = {
                "drifted": drifted,
                "score": score,
                "method": method,
                "threshold": threshold,
            }
        elif kind.endswith("DriftedColumnsCount") and isinstance(metric.get("value"), Mapping):
            share = _number(metric["value"].get("share"))
    return columns, share


# --- reports ----------------------------------------------------------------------------------------------


def detect_drift(
    previous: TaskData,
    current: TaskData,
    report_path: str | Path,
    drift_cfg: DriftConfig | None = None,
    *,
    include_text: bool | None = None,
) -> DataDriftResult:
    """Compare a new version of a task with its previous version; write the Evidently HTML report.

    drifted = the share of drifted columns >= drift_cfg.max_drift_share (the preset's own dataset-drift
    rule, given the same threshold, so the HTML and the result agree). include_text (default:
    drift_cfg.include_text) adds Evidently's text-content drift on the raw text, which costs seconds.
    """
    import numpy as np
    from evidently import Report
    from evidently.presets import DataDriftPreset

    cfg = drift_cfg or DriftConfig()
    with_text = cfg.include_text if include_text is None else include_text
    if previous.task_id != current.task_id:
        raise DriftError(
            f"drift compares two versions of one task, got {previous.task_id!r} and {current.task_id!r}"
        )
    prev_records, cur_records = task_records(previous), task_records(current)
    for name, recs in (("previous", prev_records), ("new", cur_records)):
        if not recs:
            raise DriftError(f"task {current.task_id!r}: the {name} version has no records")

    started = time.perf_counter()
    ref_frame, cur_frame = drift_frames(prev_records, cur_records)
    report = Report([DataDriftPreset(drift_share=cfg.max_drift_share)], include_tests=True)
    with np.errstate(divide="ignore", invalid="ignore"):  # a constant column (all oov_share 0) in corrcoef
        snap = report.run(
            current_data=_evidently_dataset(cur_frame, with_text),
            reference_data=_evidently_dataset(ref_frame, with_text),
        )
    columns, share = extract_drift(snap.dict())
    if share is None or math.isnan(share):
        share = sum(c["drifted"] for c in columns.values()) / len(columns) if columns else 0.0
    with atomic_path(report_path, "the drift report") as tmp:
        snap.save_html(str(tmp))
    return DataDriftResult(
        task_id=current.task_id,
        drifted=share >= cfg.max_drift_share,
        drift_share=share,
        columns=columns,
        report_path=str(report_path),
        max_drift_share=cfg.max_drift_share,
        reference_rows=len(ref_frame),
        current_rows=len(cur_frame),
        seconds=round(time.perf_counter() - started, 3),
    )


def describe_new_task(
    task: TaskData,
    report_path: str | Path,
    drift_cfg: DriftConfig | None = None,
    *,
    include_text: bool | None = None,
) -> DataDriftResult:
    """A new task has no previous version: write a descriptive (summary) report; never drifted, never gated."""
    import numpy as np
    from evidently import Report
    from evidently.presets import DataSummaryPreset

    cfg = drift_cfg or DriftConfig()
    with_text = cfg.include_text if include_text is None else include_text
    records = task_records(task)
    if not records:
        raise DriftError(f"task {task.task_id!r} has no records")
    started = time.perf_counter()
    own_df = document_frequency(r.text for r in records)
    frame = records_frame(records, own_df, leave_one_out=True)  # OOV within its own vocabulary: rare words
    with np.errstate(divide="ignore", invalid="ignore"):
        snap = Report([DataSummaryPreset()]).run(
            current_data=_evidently_dataset(frame, with_text), reference_data=None
        )
    with atomic_path(report_path, "the drift report") as tmp:
        snap.save_html(str(tmp))
    return DataDriftResult(
        task_id=task.task_id,
        drifted=False,
        drift_share=0.0,
        columns={},
        report_path=str(report_path),
        max_drift_share=cfg.max_drift_share,
        has_reference=False,
        note="new task: no previous version to compare with; descriptive report only",
        current_rows=len(frame),
        seconds=round(time.perf_counter() - started, 3),
    )

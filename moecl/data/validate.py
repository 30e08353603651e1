"""Validation and loading of task folders (format: docs/data.md).

`validate_task_folder` reads a folder and returns every problem it finds as an `Issue` that names the file,
the line and the field; it never writes anything. `load_task` validates, then returns the `TaskData`.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecl.config import DataConfig
from moecl.data.task import Record, TaskData
from moecl.errors import MoeclError

TASK_ID_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"
_TASK_ID_RE = re.compile(TASK_ID_PATTERN + r"\Z")
TASK_YAML = "task.yaml"
REQUIRED_SPLITS = ("train", "test")
OPTIONAL_SPLITS = ("dev",)
TASK_YAML_KEYS = ("labels", "instruction", "description", "positive_label")
RECORD_KEYS = ("text", "label", "id")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Issue:
    """One problem: `file:line: field: message` (line and field are None where they do not apply)."""

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field, "message": self.message}


class DataValidationError(MoeclError):
    """A task folder (or an import) failed validation; `.issues` lists every problem."""

    def __init__(self, issues: list[Issue], what: str = "task data"):
        self.issues = list(issues)
        shown = "\n".join(f"  {i}" for i in self.issues[:50])
        more = f"\n  ... and {len(self.issues) - 50} more" if len(self.issues) > 50 else ""
        super().__init__(f"{what} failed validation ({len(self.issues)} issue(s)):\n{shown}{more}")


def normalise_text(text: str) -> str:
    """The form used to detect the same record in two splits: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def task_id_issues(task_id: Any, where: str) -> list[Issue]:
    """Problems with a task id (it becomes a folder name, so no slashes, dots-only names or uppercase)."""
    if isinstance(task_id, str) and _TASK_ID_RE.match(task_id):
        return []
    return [
        Issue(where, None, "task_id", f"{task_id!r} is not a valid task id (must match {TASK_ID_PATTERN})")
    ]


def list_task_folders(root: str | Path) -> list[Path]:
    """Every task folder under root (sorted; hidden entries such as an importer's temp folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def task_folder_hash(path: str | Path) -> str:
    """sha256 over the folder's files: each file's relative POSIX name and bytes, in sorted order."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(
        (p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()
    ):
        rel = f.relative_to(path).as_posix().encode("utf-8")
        data = f.read_bytes()
        h.update(len(rel).to_bytes(8, "big") + rel)
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- task.yaml


def _yaml_key_lines(text: str) -> dict[str, int]:
    """1-based line of each top-level key, for issues that point at a key (best effort)."""
    import yaml

    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}


def _read_task_yaml(folder: Path) -> tuple[dict[str, Any] | None, list[Issue]]:
    import yaml

    path = folder / TASK_YAML
    where = str(path)
    if not path.is_file():
        return None, [
            Issue(where, None, None, "missing: every task folder needs a task.yaml (see docs/data.md)")
        ]
    raw = path.read_bytes()
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return None, [Issue(where, line, None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})")]
    try:
        meta = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return None, [Issue(where, line, None, f"not valid YAML: {problem}")]
    if not isinstance(meta, dict):
        return None, [Issue(where, None, None, f"must be a YAML mapping, got {type(meta).__name__}")]

    lines = _yaml_key_lines(text)
    issues: list[Issue] = []

    def bad(key: str, message: str) -> None:
        issues.append(Issue(where, lines.get(key), key, message))

    for key in meta:
        if key not in TASK_YAML_KEYS:
            bad(str(key), f"unknown key (known: {', '.join(TASK_YAML_KEYS)})")
    labels = meta.get("labels")
    if "labels" not in meta:
        issues.append(Issue(where, None, "labels", "missing: an ordered list of the label strings"))
    elif not isinstance(labels, list) or not labels:
        bad("labels", "must be a non-empty list of strings")
    else:
        seen: set[str] = set()
        for label in labels:
            if not isinstance(label, str) or not label.strip() or label != label.strip() or "\n" in label:
                bad("labels", f"{label!r} is not a label: labels are non-empty strings without outer spaces")
            elif label in seen:
                bad("labels", f"{label!r} is listed twice")
            else:
                seen.add(label)
        if len(labels) < 2:
            bad("labels", "a task needs at least two labels")
    if "instruction" not in meta:
        issues.append(Issue(where, None, "instruction", "missing: the instruction text (a string)"))
    elif not isinstance(meta["instruction"], str) or not meta["instruction"].strip():
        bad("instruction", "must be a non-empty string")
    if "description" in meta and not isinstance(meta["description"], str):
        bad("description", "must be a string")
    positive = meta.get("positive_label")
    if positive is not None:
        if not isinstance(labels, list) or positive not in labels:
            bad("positive_label", f"{positive!r} is not one of the declared labels")
        elif len(labels) != 2:
            bad("positive_label", "only a binary task (two labels) can have a positive_label")
    return (meta if not issues else None), issues


# ---------------------------------------------------------------------------------------------- records


@dataclass
class _Line:
    number: int
    record: Record


def _split_lines(raw: bytes) -> list[bytes]:
    """Lines of a file with a BOM, CRLF endings and trailing blank lines tolerated."""
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    lines = raw.split(b"\n")
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _read_records(path: Path, cfg: DataConfig) -> tuple[list[_Line], list[Issue]]:
    where = str(path)
    raw = path.read_bytes()
    lines = _split_lines(raw)
    if not lines:
        return [], [Issue(where, None, None, "empty file: a split needs at least one record")]
    issues: list[Issue] = []
    records: list[_Line] = []
    ids: dict[str, int] = {}
    if len(lines) > cfg.max_records:
        issues.append(
            Issue(
                where,
                cfg.max_records + 1,
                None,
                f"{len(lines)} records, more than data.max_records={cfg.max_records}",
            )
        )
        lines = lines[: cfg.max_records]
    for number, line in enumerate(lines, start=1):

        def bad(field: str | None, message: str, number: int = number) -> None:
            issues.append(Issue(where, number, field, message))

        try:
            text_line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad(None, f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})")
            continue
        if not text_line.strip():
            bad(None, "blank line (only trailing blank lines are allowed)")
            continue
        try:
            obj = json.loads(text_line)
        except json.JSONDecodeError as exc:
            bad(None, f"not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            bad(None, f"must be a JSON object, got {type(obj).__name__}")
            continue
        ok = True
        for key in obj:
            if key not in RECORD_KEYS:
                bad(str(key), f"unknown field (known: {', '.join(RECORD_KEYS)})")
                ok = False
        for key in ("text", "label"):
            if key not in obj:
                bad(key, "missing")
                ok = False
            elif not isinstance(obj[key], str):
                bad(key, f"must be a string, got {type(obj[key]).__name__}")
                ok = False
        rid = obj.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
            bad("id", f"must be a string or an integer, got {type(rid).__name__}")
            ok = False
        elif rid is not None:
            if str(rid) in ids:
                bad("id", f"duplicate id {rid!r} (first on line {ids[str(rid)]})")
                ok = False
            else:
                ids[str(rid)] = number
        if not ok:
            continue
        text = obj["text"]
        if not text.strip():
            bad("text", "empty text")
            continue
        if len(text) > cfg.max_text_chars:
            bad("text", f"{len(text)} characters, more than data.max_text_chars={cfg.max_text_chars}")
            continue
        records.append(
            _Line(number, Record(text=text, label=obj["label"], id=None if rid is None else str(rid)))
        )
    return records, issues


def _label_issues(path: Path, lines: list[_Line], labels: list[str]) -> list[Issue]:
    declared = set(labels)
    return [
        Issue(
            str(path),
            ln.number,
            "label",
            f"{ln.record.label!r} is not a declared label (declared: {', '.join(labels)})",
        )
        for ln in lines
        if ln.record.label not in declared
    ]


def _coverage_issues(path: Path, lines: list[_Line], labels: list[str], cfg: DataConfig) -> list[Issue]:
    counts = {label: 0 for label in labels}
    for ln in lines:
        if ln.record.label in counts:
            counts[ln.record.label] += 1
    issues = [
        Issue(
            str(path),
            None,
            "label",
            f"declared label {label!r} has {n} training example(s); data.min_examples_per_label={cfg.min_examples_per_label}",
        )
        for label, n in counts.items()
        if n < max(1, cfg.min_examples_per_label)
    ]
    present = [label for label, n in counts.items() if n > 0]
    if len(present) < 2:
        issues.append(
            Issue(
                str(path),
                None,
                "label",
                f"only {len(present)} distinct label(s) in train ({', '.join(map(repr, present))}); "
                "a task needs at least two",
            )
        )
    return issues


def _leakage_issues(test_path: Path, test: list[_Line], other_path: Path, other: list[_Line]) -> list[Issue]:
    first: dict[str, int] = {}
    for ln in other:
        first.setdefault(normalise_text(ln.record.text), ln.number)
    issues = []
    for ln in test:
        hit = first.get(normalise_text(ln.record.text))
        if hit is not None:
            issues.append(
                Issue(
                    str(test_path),
                    ln.number,
                    "text",
                    f"same text as {other_path.name} line {hit} (leakage between splits)",
                )
            )
    return issues


# ---------------------------------------------------------------------------------------------- entry points


def _inspect(path: Path, cfg: DataConfig, task_id: str | None) -> tuple[list[Issue], dict[str, Any]]:
    path = Path(path)
    issues: list[Issue] = []
    if not path.is_dir():
        return [Issue(str(path), None, None, "not a folder")], {}
    issues += task_id_issues(task_id if task_id is not None else path.name, str(path))
    meta, meta_issues = _read_task_yaml(path)
    issues += meta_issues
    splits: dict[str, list[_Line]] = {}
    for name in REQUIRED_SPLITS + OPTIONAL_SPLITS:
        f = path / f"{name}.jsonl"
        if not f.is_file():
            if name in REQUIRED_SPLITS:
                issues.append(Issue(str(f), None, None, f"missing: a task needs {name}.jsonl"))
            continue
        lines, split_issues = _read_records(f, cfg)
        issues += split_issues
        splits[name] = lines
    if meta is not None:
        labels = list(meta["labels"])
        for name, lines in splits.items():
            issues += _label_issues(path / f"{name}.jsonl", lines, labels)
        if "train" in splits and splits["train"]:
            issues += _coverage_issues(path / "train.jsonl", splits["train"], labels, cfg)
    if "test" in splits:
        for other in ("train", "dev"):
            if other in splits:
                issues += _leakage_issues(
                    path / "test.jsonl", splits["test"], path / f"{other}.jsonl", splits[other]
                )
    return issues, {"meta": meta, "splits": splits}


def validate_task_folder(
    path: str | Path, data_cfg: DataConfig | None = None, *, task_id: str | None = None
) -> list[Issue]:
    """Every problem in a task folder (empty list = valid). `task_id` overrides the folder name's id check."""
    issues, _ = _inspect(Path(path), data_cfg or DataConfig(), task_id)
    return issues


def load_task(path: str | Path, data_cfg: DataConfig | None = None) -> TaskData:
    """Validate a task folder and load it; raises DataValidationError listing every issue."""
    path = Path(path)
    issues, parsed = _inspect(path, data_cfg or DataConfig(), None)
    if issues:
        raise DataValidationError(issues, what=f"task folder {path}")
    meta, splits = parsed["meta"], parsed["splits"]
    return TaskData(
        task_id=path.name,
        labels=list(meta["labels"]),
        train=[ln.record for ln in splits["train"]],
        test=[ln.record for ln in splits["test"]],
        instruction=meta["instruction"],
        description=meta.get("description") or "",
        positive_label=meta.get("positive_label"),
        dev=[ln.record for ln in splits["dev"]] if "dev" in splits else None,
        path=path,
    )

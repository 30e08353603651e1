"""Importers: turn a benchmark folder, a JSONL/CSV file or a Hugging Face dataset into a task folder.

Every importer reads its source into (text, label) rows, samples them (stratified, seeded), and hands them to
`write_task`, which writes a temp folder beside the destination, validates it with the same validator as
`moecl data validate`, and only then moves it into place atomically. A failed import changes nothing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from moecl.config import DataConfig
from moecl.data.task import Record
from moecl.data.validate import (
    TASK_YAML,
    DataValidationError,
    normalise_text,
    task_id_issues,
    validate_task_folder,
)
from moecl.errors import MoeclError
from moecl.io import install_folder, temp_folder_beside
from moecl.sampling import sample_per_class, split_off_test


class SourceError(MoeclError):
    """A source that cannot be imported (missing file, missing column, unknown labels ...)."""


@dataclass
class ImportOptions:
    """What to keep from a source. Caps are per class (stratified); sizes are split totals (0 = no cap)."""

    task_id: str
    labels: list[str] | None = None  # label order; default: the source's own order (labels.json) or sorted
    instruction: str | None = None  # default: generated from the labels
    description: str = ""
    positive_label: str | None = None
    per_class: int = 0  # train cap per class
    test_per_class: int = 0  # test cap per class
    train_size: int = 0  # train total cap (proportional, stratified)
    test_size: int = 0  # test total cap
    test_fraction: float = 0.2  # share of the rows put into test when the source has no test split
    seed: int = 42


@dataclass
class ImportReport:
    path: Path
    task_id: str
    labels: list[str]
    counts: dict[str, dict[str, int]]  # split -> label -> n
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> n

    def summary(self) -> str:
        parts = [f"{split}={sum(c.values())}" for split, c in self.counts.items()]
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items() if n)
        return f"{self.task_id}: {', '.join(parts)} ({len(self.labels)} labels) -> {self.path}" + (
            f"; dropped {dropped}" if dropped else ""
        )


# ---------------------------------------------------------------------------------------------- deduplication


def _dedupe(rows: Iterable[Record], seen: set[str]) -> tuple[list[Record], int]:
    kept, dropped = [], 0
    for r in rows:
        key = normalise_text(r.text)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        kept.append(r)
    return kept, dropped


# ---------------------------------------------------------------------------------------------- writing


def _write_jsonl(path: Path, rows: Sequence[Record]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            obj = {"text": r.text, "label": r.label}
            if r.id is not None:
                obj["id"] = r.id
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _task_yaml(labels: Sequence[str], instruction: str, description: str, positive_label: str | None) -> str:
    import yaml

    meta = {"labels": list(labels), "instruction": instruction, "description": description}
    if positive_label is not None:
        meta["positive_label"] = positive_label
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)


def write_task(
    dest_root: str | Path,
    task_id: str,
    labels: Sequence[str],
    train: Sequence[Record],
    test: Sequence[Record],
    *,
    dev: Sequence[Record] | None = None,
    instruction: str | None = None,
    description: str = "",
    positive_label: str | None = None,
    data_cfg: DataConfig | None = None,
) -> Path:
    """Write a task folder atomically; raise DataValidationError (destination untouched) if it is not valid."""
    issues = task_id_issues(task_id, "task id")
    if issues:
        raise DataValidationError(issues, what=f"import of task {task_id!r}")
    dest_root = Path(dest_root)
    created_root = not dest_root.exists()
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder_beside(dest_root / task_id)
    try:
        (tmp / TASK_YAML).write_text(
            _task_yaml(labels, instruction or default_instruction(labels), description, positive_label),
            encoding="utf-8",
        )
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "test.jsonl", test)
        if dev:
            _write_jsonl(tmp / "dev.jsonl", dev)
        issues = validate_task_folder(tmp, data_cfg, task_id=task_id)
        if issues:  # name the files as they would have been in place, not the deleted temp folder
            issues = [replace(i, file=i.file.replace(str(tmp), str(dest_root / task_id), 1)) for i in issues]
            raise DataValidationError(issues, what=f"import of task {task_id!r}")
        install_folder(tmp, dest_root / task_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_root:
            shutil.rmtree(dest_root, ignore_errors=True)
        raise
    return dest_root / task_id


def default_instruction(labels: Sequence[str]) -> str:
    return f"Classify the text. Answer with one of: {', '.join(labels)}."


# ---------------------------------------------------------------------------------------------- the pipeline


def _resolve_labels(
    rows: Iterable[Record], given: list[str] | None, source_order: list[str] | None, where: str
) -> list[str]:
    found = Counter(r.label for r in rows)
    if given:
        unknown = sorted(set(found) - set(given))
        if unknown:
            raise SourceError(f"{where}: labels {unknown} occur in the source but not in --labels {given}")
        return list(given)
    if source_order:
        unknown = sorted(set(found) - set(source_order))
        if unknown:
            raise SourceError(f"{where}: labels {unknown} occur in the source but not in its label list")
        return list(source_order)
    return sorted(found)


def import_rows(
    train_rows: list[Record],
    test_rows: list[Record] | None,
    opts: ImportOptions,
    dest_root: str | Path,
    *,
    source_labels: list[str] | None = None,
    where: str = "source",
    data_cfg: DataConfig | None = None,
) -> ImportReport:
    """Dedupe, split (when there is no test split), sample, and write. Shared by every importer."""
    issues = task_id_issues(opts.task_id, "--task-id")
    if issues:
        raise DataValidationError(issues, what=f"import of task {opts.task_id!r}")
    dropped: Counter[str] = Counter()
    kept_train = [r for r in train_rows if r.text.strip()]
    kept_test = [r for r in test_rows or [] if r.text.strip()]
    dropped["empty texts"] = len(train_rows) + len(test_rows or []) - len(kept_train) - len(kept_test)
    labels = _resolve_labels(kept_train + kept_test, opts.labels, source_labels, where)
    seen: set[str] = set()
    kept_train, n = _dedupe(kept_train, seen)
    dropped["duplicate texts"] += n
    if test_rows is None:
        kept_train, kept_test = split_off_test(kept_train, labels, opts.test_fraction, opts.seed)
    else:
        kept_test, n = _dedupe(kept_test, seen)
        dropped["test texts also in train"] += n
    train = sample_per_class(kept_train, labels, opts.per_class, opts.train_size, opts.seed, "train")
    test = sample_per_class(kept_test, labels, opts.test_per_class, opts.test_size, opts.seed, "test")
    path = write_task(
        dest_root,
        opts.task_id,
        labels,
        train,
        test,
        instruction=opts.instruction,
        description=opts.description,
        positive_label=opts.positive_label,
        data_cfg=data_cfg,
    )
    counts = {
        name: {label: sum(r.label == label for r in split) for label in labels}
        for name, split in (("train", train), ("test", test))
    }
    return ImportReport(path=path, task_id=opts.task_id, labels=labels, counts=counts, dropped=dict(dropped))


# ---------------------------------------------------------------------------------------------- sources


def _as_text(value, where: str, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise SourceError(f"{where}: column {column!r} holds {type(value).__name__}, not text")


# The CL benchmark's tasks by instruction family (its instruction_config.json keys), and each family's instruction
# where that file is absent.
BENCHMARK_FAMILY = {"agnews": "TC", "dbpedia": "TC", "yahoo": "TC", "amazon": "SC", "yelp": "SC"}
BENCHMARK_INSTRUCTION = {
    "TC": "What is the topic of the following paragraph? Choose one from the option.",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.",
}


def benchmark_instruction(folder: str | Path) -> str | None:
    """The benchmark's own instruction for the task in `folder` (its family's first entry in the benchmark's
    ../instruction_config.json, else BENCHMARK_INSTRUCTION's); None for a task of no known family."""
    folder = Path(folder)
    family, config = BENCHMARK_FAMILY.get(folder.name), folder.parent / "instruction_config.json"
    if family is None or not config.is_file():
        return BENCHMARK_INSTRUCTION.get(family)
    try:
        entries = json.loads(config.read_text(encoding="utf-8")).get(family) or [{}]
        instruction = entries[0].get("instruction")
    except (ValueError, AttributeError, LookupError, TypeError) as exc:
        raise SourceError(
            f"{config}: {family}: not a list of {{'instruction': ...}} objects ({exc!r})"
        ) from None
    return (
        instruction.strip()
        if isinstance(instruction, str) and instruction.strip()
        else BENCHMARK_INSTRUCTION[family]
    )


def read_benchmark(folder: str | Path) -> tuple[list[Record], list[Record], list[str]]:
    """The CL-benchmark layout: train.json / test.json (JSON lists of {"sentence", "label"}) + labels.json."""
    folder = Path(folder)
    out = []
    for name in ("train.json", "test.json", "labels.json"):
        f = folder / name
        if not f.is_file():
            raise SourceError(f"{f}: missing (a benchmark folder has train.json, test.json and labels.json)")
        try:
            out.append(json.loads(f.read_text(encoding="utf-8-sig")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{f}: not valid UTF-8 JSON: {exc}") from None
    train_raw, test_raw, labels = out
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise SourceError(f"{folder / 'labels.json'}: must be a JSON list of label strings")
    splits = []
    for name, raw in (("train.json", train_raw), ("test.json", test_raw)):
        where = str(folder / name)
        if not isinstance(raw, list):
            raise SourceError(f"{where}: must be a JSON list of records")
        rows = []
        for i, obj in enumerate(raw):
            if not isinstance(obj, dict) or "sentence" not in obj or "label" not in obj:
                raise SourceError(f"{where}: record {i}: needs 'sentence' and 'label'")
            rows.append(
                Record(
                    _as_text(obj["sentence"], f"{where}: record {i}", "sentence"),
                    _as_text(obj["label"], f"{where}: record {i}", "label"),
                )
            )
        splits.append(rows)
    return splits[0], splits[1], labels


def read_table(
    path: str | Path, text_column: str = "text", label_column: str = "label", fmt: str | None = None
) -> list[Record]:
    """Rows of a JSONL or CSV file (format from the suffix unless `fmt` says 'jsonl' or 'csv')."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    fmt = fmt or ("csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl")
    rows = []
    if fmt == "csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            for col in (text_column, label_column):
                if col not in (reader.fieldnames or []):
                    raise SourceError(
                        f"{path}: no column {col!r} (columns: {', '.join(reader.fieldnames or [])})"
                    )
            for line, row in enumerate(reader, start=2):
                rows.append(
                    Record(
                        _as_text(row[text_column], f"{path}:{line}", text_column),
                        _as_text(row[label_column], f"{path}:{line}", label_column).strip(),
                    )
                )
        return rows
    with path.open(encoding="utf-8-sig") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}:{line}: not valid JSON: {exc.msg}") from None
            for col in (text_column, label_column):
                if not isinstance(obj, dict) or col not in obj:
                    raise SourceError(f"{path}:{line}: {col}: missing")
            rows.append(
                Record(
                    _as_text(obj[text_column], f"{path}:{line}", text_column),
                    _as_text(obj[label_column], f"{path}:{line}", label_column),
                )
            )
    return rows


def _hf_rows(ds, text_column: str, label_column: str, where: str) -> tuple[list[Record], list[str] | None]:
    for col in (text_column, label_column):
        if col not in ds.column_names:
            raise SourceError(f"{where}: no column {col!r} (columns: {', '.join(ds.column_names)})")
    feature = ds.features[label_column]
    names = list(feature.names) if hasattr(feature, "names") else None
    rows = []
    for text, label in zip(ds[text_column], ds[label_column]):
        if names is not None and isinstance(label, int):
            label = names[label]
        rows.append(Record(_as_text(text, where, text_column), _as_text(label, where, label_column)))
    return rows, names


def read_hf(
    source: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    train_split: str = "train",
    test_split: str = "test",
):
    """A `datasets` dataset: a local save_to_disk folder, or a hub name where the hub is reachable.

    Returns (train_rows, test_rows or None, label names or None).
    """
    import datasets

    src = Path(source)
    try:
        if src.exists():
            ds = datasets.load_from_disk(str(src))
        else:
            ds = datasets.load_dataset(str(source))
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear error
        hint = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        raise SourceError(f"{source}: cannot load the dataset{hint}: {type(exc).__name__}: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if train_split not in ds:
            raise SourceError(f"{source}: no split {train_split!r} (splits: {', '.join(ds)})")
        train, names = _hf_rows(ds[train_split], text_column, label_column, f"{source}[{train_split}]")
        test = None
        if test_split in ds:
            test, _ = _hf_rows(ds[test_split], text_column, label_column, f"{source}[{test_split}]")
        return train, test, names
    train, names = _hf_rows(ds, text_column, label_column, str(source))
    return train, None, names


def import_benchmark(
    folder: str | Path, opts: ImportOptions, dest_root: str | Path, data_cfg: DataConfig | None = None
) -> ImportReport:
    """A benchmark folder (read_benchmark) as a task; without --instruction, the benchmark's own for the task."""
    train, test, labels = read_benchmark(folder)
    if opts.instruction is None:
        opts = replace(opts, instruction=benchmark_instruction(folder))
    return import_rows(
        train, test, opts, dest_root, source_labels=labels, where=str(folder), data_cfg=data_cfg
    )


def import_table(
    path: str | Path,
    opts: ImportOptions,
    dest_root: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    test_path: str | Path | None = None,
    fmt: str | None = None,
    data_cfg: DataConfig | None = None,
) -> ImportReport:
    train = read_table(path, text_column, label_column, fmt)
    test = read_table(test_path, text_column, label_column, fmt) if test_path else None
    return import_rows(train, test, opts, dest_root, where=str(path), data_cfg=data_cfg)


def import_hf(
    source: str | Path,
    opts: ImportOptions,
    dest_root: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    train_split: str = "train",
    test_split: str = "test",
    data_cfg: DataConfig | None = None,
) -> ImportReport:
    train, test, names = read_hf(source, text_column, label_column, train_split, test_split)
    return import_rows(
        train, test, opts, dest_root, source_labels=names, where=str(source), data_cfg=data_cfg
    )

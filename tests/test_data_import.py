"""Importers: benchmark layout, JSONL/CSV, datasets save_to_disk; validated, deterministic, atomic."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from moecl.cli import main
from moecl.data import importers
from moecl.data.importers import ImportOptions, SourceError, import_benchmark, import_hf, import_table
from moecl.data.validate import DataValidationError, load_task, task_folder_hash, validate_task_folder

AGNEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtl5" / "agnews"
LABELS = ["World", "Sports", "Science or Technology"]


def make_benchmark(root: Path, n_train: int = 10, n_test: int = 5, leak: bool = False) -> Path:
    folder = root / "bench_src"
    folder.mkdir(parents=True)
    train = [
        {"sentence": f"Title: {lab} story {i}\nText: body {i} about {lab}\n", "label": lab}
        for lab in LABELS
        for i in range(n_train)
    ]
    test = [
        {"sentence": f"Title: {lab} report {i}\nText: other {i}\n", "label": lab}
        for lab in LABELS
        for i in range(n_test)
    ]
    if leak:
        test.append(dict(train[0]))
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "test.json").write_text(json.dumps(test))
    (folder / "labels.json").write_text(json.dumps(LABELS))
    return folder


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(root.rglob("*"))
    }


def counts(path: Path) -> dict[str, dict[str, int]]:
    task = load_task(path)
    return {
        split: {lab: sum(r.label == lab for r in getattr(task, split)) for lab in task.labels}
        for split in ("train", "test")
    }


def test_benchmark_import_writes_a_valid_sampled_folder(tmp_path):
    src = make_benchmark(tmp_path)
    opts = ImportOptions(
        task_id="topics", per_class=4, test_per_class=2, instruction="Topic?", description="d"
    )
    report = import_benchmark(src, opts, tmp_path / "tasks")
    path = tmp_path / "tasks" / "topics"
    assert report.path == path and validate_task_folder(path) == []
    task = load_task(path)
    assert task.labels == LABELS and task.instruction == "Topic?" and task.description == "d"
    assert counts(path) == {"train": dict.fromkeys(LABELS, 4), "test": dict.fromkeys(LABELS, 2)}
    assert report.counts == counts(path)
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == ["topics"]  # no temp folder left


def test_a_benchmark_task_gets_the_benchmarks_own_instruction(tmp_path):
    """A task of a known family takes its family's instruction from ../instruction_config.json (else the built-in
    one); an unknown task, or --instruction, keeps the old behaviour; a broken config names its file."""
    src = make_benchmark(tmp_path)
    agnews = src.rename(tmp_path / "agnews")
    config = {"TC": [{"instruction": "Which topic? Choose one.\n"}], "SC": [{"instruction": "Mood?"}]}
    imported = import_benchmark(agnews, ImportOptions(task_id="a"), tmp_path / "built_in").path
    assert load_task(imported).instruction == importers.BENCHMARK_INSTRUCTION["TC"]
    (tmp_path / "instruction_config.json").write_text(json.dumps(config))
    configured = import_benchmark(agnews, ImportOptions(task_id="a"), tmp_path / "t").path
    assert load_task(configured).instruction == "Which topic? Choose one."
    given = ImportOptions(task_id="a", instruction="Topic?")
    assert load_task(import_benchmark(agnews, given, tmp_path / "given").path).instruction == "Topic?"
    other = agnews.rename(tmp_path / "mine")
    assert importers.benchmark_instruction(other) is None
    unknown = import_benchmark(other, ImportOptions(task_id="a"), tmp_path / "o").path
    assert load_task(unknown).instruction == importers.default_instruction(LABELS)
    (tmp_path / "instruction_config.json").write_text(json.dumps({"TC": "not a list"}))
    with pytest.raises(SourceError, match="instruction_config.json: TC"):
        importers.benchmark_instruction(other.rename(tmp_path / "yahoo"))


def test_total_sizes_are_stratified(tmp_path):
    src = make_benchmark(tmp_path)
    import_benchmark(src, ImportOptions(task_id="t", train_size=8, test_size=7), tmp_path / "tasks")
    c = counts(tmp_path / "tasks" / "t")
    assert sum(c["train"].values()) == 8 and sorted(c["train"].values()) == [2, 3, 3]
    assert sum(c["test"].values()) == 7 and sorted(c["test"].values()) == [2, 2, 3]


def test_import_is_deterministic(tmp_path):
    src = make_benchmark(tmp_path)
    hashes = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        import_benchmark(
            src, ImportOptions(task_id="t", per_class=5, test_per_class=3, seed=seed), tmp_path / name
        )
        hashes.append(task_folder_hash(tmp_path / name / "t"))
    assert hashes[0] == hashes[1] != hashes[2]


def test_leaked_test_records_are_dropped(tmp_path):
    src = make_benchmark(tmp_path, leak=True)
    report = import_benchmark(src, ImportOptions(task_id="t"), tmp_path / "tasks")
    assert report.dropped["test texts also in train"] == 1
    assert validate_task_folder(report.path) == []


def test_failed_import_leaves_the_destination_unchanged(tmp_path):
    src = make_benchmark(tmp_path)
    dest = tmp_path / "tasks"
    import_benchmark(src, ImportOptions(task_id="t", per_class=3), dest)
    before = snapshot(dest)
    with pytest.raises(DataValidationError) as err:  # one example per class is below min_examples_per_label
        import_benchmark(src, ImportOptions(task_id="t", per_class=1), dest)
    assert snapshot(dest) == before
    assert all(str(dest / "t" / "train.jsonl") == i.file for i in err.value.issues)
    with pytest.raises(DataValidationError):
        import_benchmark(src, ImportOptions(task_id="../x"), dest)
    with pytest.raises(SourceError, match="not in --labels"):
        import_benchmark(src, ImportOptions(task_id="t", labels=["World", "Sports"]), dest)
    assert snapshot(dest) == before
    assert not (tmp_path / "x").exists()


def test_failed_import_into_a_new_root_creates_nothing(tmp_path):
    src = make_benchmark(tmp_path)
    with pytest.raises(DataValidationError):
        import_benchmark(src, ImportOptions(task_id="t", per_class=1), tmp_path / "new" / "tasks")
    assert not (tmp_path / "new" / "tasks").exists()


def test_a_new_version_replaces_the_old_one_whole(tmp_path):
    src = make_benchmark(tmp_path)
    dest = tmp_path / "tasks"
    import_benchmark(src, ImportOptions(task_id="t", per_class=3), dest)
    import_benchmark(src, ImportOptions(task_id="t", per_class=6), dest)
    assert counts(dest / "t")["train"] == dict.fromkeys(LABELS, 6)
    assert [p.name for p in dest.iterdir()] == ["t"]


def test_install_restores_the_old_version_if_the_swap_fails(tmp_path, monkeypatch):
    src = make_benchmark(tmp_path)
    dest = tmp_path / "tasks"
    import_benchmark(src, ImportOptions(task_id="t", per_class=3), dest)
    before = snapshot(dest)
    real_replace = os.replace
    calls = []

    def flaky_replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # old moved away, new about to move in
            raise OSError("disk trouble")
        return real_replace(a, b)

    monkeypatch.setattr(importers.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk trouble"):
        import_benchmark(src, ImportOptions(task_id="t", per_class=6), dest)
    monkeypatch.undo()
    assert snapshot(dest) == before


def test_jsonl_import_with_split_and_columns(tmp_path):
    src = tmp_path / "rows.jsonl"
    rows = [{"body": f"message {i} about {lab}", "cls": lab} for lab in ("ham", "spam") for i in range(20)]
    rows.append({"body": "message 0 about ham", "cls": "ham"})  # a duplicate
    rows.append({"body": "", "cls": "ham"})  # empty
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    opts = ImportOptions(task_id="mail", positive_label="spam", test_fraction=0.25, seed=3)
    report = import_table(src, opts, tmp_path / "tasks", text_column="body", label_column="cls")
    task = load_task(report.path)
    assert task.labels == ["ham", "spam"] and task.positive_label == "spam"
    assert len(task.train) == 30 and len(task.test) == 10
    assert report.dropped == {"empty texts": 1, "duplicate texts": 1}
    with pytest.raises(SourceError, match="no column|missing"):
        import_table(src, ImportOptions(task_id="m2"), tmp_path / "tasks")


def test_csv_import_with_a_test_file(tmp_path):
    def write(path: Path, n: int, tag: str) -> None:
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "review", "stars"])
            for i in range(n):
                for stars in ("1", "5"):
                    w.writerow([i, f"{tag} review {i}, rated {stars}", stars])

    write(tmp_path / "train.csv", 6, "train")
    write(tmp_path / "test.csv", 3, "test")
    opts = ImportOptions(task_id="stars", labels=["5", "1"])
    report = import_table(
        tmp_path / "train.csv",
        opts,
        tmp_path / "tasks",
        text_column="review",
        label_column="stars",
        test_path=tmp_path / "test.csv",
    )
    task = load_task(report.path)
    assert task.labels == ["5", "1"] and len(task.train) == 12 and len(task.test) == 6
    with pytest.raises(SourceError, match="no column 'text'"):
        import_table(tmp_path / "train.csv", ImportOptions(task_id="x"), tmp_path / "tasks")


def test_hf_save_to_disk_import(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )

    def split(tag: str, n: int):
        return datasets.Dataset.from_dict(
            {"sentence": [f"{tag} text {i}" for i in range(2 * n)], "label": [i % 2 for i in range(2 * n)]},
            features=features,
        )

    dd = datasets.DatasetDict({"train": split("train", 8), "test": split("test", 4)})
    dd.save_to_disk(str(tmp_path / "dd"))
    report = import_hf(
        tmp_path / "dd",
        ImportOptions(task_id="hfdd", per_class=5),
        tmp_path / "tasks",
        text_column="sentence",
    )
    task = load_task(report.path)
    assert task.labels == ["neg", "pos"] and len(task.train) == 10 and len(task.test) == 8

    split("single", 10).save_to_disk(str(tmp_path / "one"))
    report = import_hf(
        tmp_path / "one",
        ImportOptions(task_id="hfone", test_fraction=0.3),
        tmp_path / "tasks",
        text_column="sentence",
    )
    task = load_task(report.path)
    assert len(task.train) == 14 and len(task.test) == 6


def test_hf_missing_dataset_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SourceError, match="cannot load the dataset"):
        import_hf("no-such-org/no-such-dataset", ImportOptions(task_id="x"), tmp_path / "tasks")
    assert not (tmp_path / "tasks").exists()


def test_cli_import_and_validate(tmp_path, capsys):
    src = make_benchmark(tmp_path)
    dest = tmp_path / "tasks"
    rc = main(
        [
            "--params",
            str(tmp_path / "none.yaml"),
            "data",
            "import",
            "benchmark",
            str(src),
            "--task-id",
            "topics",
            "--dest",
            str(dest),
            "--per-class",
            "3",
            "--seed",
            "7",
        ]
    )
    assert rc == 0 and "topics: train=9, test=15" in capsys.readouterr().out
    assert main(["--params", str(tmp_path / "none.yaml"), "-S", f"data.root={dest}", "data", "validate"]) == 0
    assert capsys.readouterr().out.strip() == f"{dest / 'topics'}: ok"
    (dest / "topics" / "test.jsonl").write_text('{"text": "x", "label": "Nope"}\n')
    assert main(["data", "validate", "--json", str(dest / "topics")]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out[str(dest / "topics")][0] == {
        "file": str(dest / "topics" / "test.jsonl"),
        "line": 1,
        "field": "label",
        "message": out[str(dest / "topics")][0]["message"],
    }
    rc = main(["data", "import", "benchmark", str(src), "--task-id", "UPPER", "--dest", str(dest)])
    assert rc == 2 and "task_id" in capsys.readouterr().err


@pytest.mark.skipif(not AGNEWS.is_dir(), reason=f"benchmark data not present at {AGNEWS}")
def test_agnews_benchmark_import(tmp_path):
    opts = ImportOptions(task_id="agnews", per_class=50, test_per_class=25)
    report = import_benchmark(AGNEWS, opts, tmp_path / "tasks")
    task = load_task(report.path)
    assert task.labels == json.loads((AGNEWS / "labels.json").read_text())
    assert len(task.train) == 200 and len(task.test) == 100
    again = import_benchmark(AGNEWS, opts, tmp_path / "again")
    assert task_folder_hash(report.path) == task_folder_hash(again.path)

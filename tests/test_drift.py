"""Data drift of a new version of a known task (Evidently), and the descriptive report of a new task."""

import random
from pathlib import Path

import pytest

from moecl.config import DriftConfig, GateConfig
from moecl.data.task import Record, TaskData
from moecl.drift import (
    DriftError,
    describe_new_task,
    detect_drift,
    document_frequency,
    drift_frames,
    extract_drift,
    oov_shares,
)
from moecl.gates import check_data_drift

# Zipf-like word frequencies over a large vocabulary, so a fresh sample has some out-of-vocabulary words.
VOCAB = [f"word{i}" for i in range(3000)]
OTHER_VOCAB = [f"other{i}" for i in range(3000)]
ZIPF = [1 / (rank + 1) for rank in range(3000)]


def make_version(seed, n=200, length=12, vocab=VOCAB, weights=(1, 1), task_id="reviews"):
    rng = random.Random(seed)

    def records(count):
        out = []
        for _ in range(count):
            words = rng.choices(vocab, ZIPF, k=rng.randint(length // 2, length * 2))
            out.append(Record(" ".join(words), rng.choices(["pos", "neg"], weights)[0]))
        return out

    return TaskData(task_id=task_id, labels=["pos", "neg"], train=records(n), test=records(n // 4))


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def previous():
    return make_version(seed=1)


@pytest.fixture(scope="module")
def same_result(previous, tmp_path_factory):
    folder = tmp_path_factory.mktemp("same")
    return folder, detect_drift(previous, make_version(seed=2), folder / "same.html", DriftConfig())


@pytest.fixture(scope="module")
def drifted_result(previous, tmp_path_factory):
    folder = tmp_path_factory.mktemp("drifted")
    # 10x longer texts, another vocabulary, labels 9:1 instead of 1:1
    current = make_version(seed=3, length=120, vocab=OTHER_VOCAB, weights=(9, 1))
    return folder, detect_drift(previous, current, folder / "drifted.html", DriftConfig())


def test_same_distribution_does_not_drift(same_result):
    folder, result = same_result
    assert not result.drifted
    assert not result.columns["oov_share"]["drifted"]
    assert result.has_reference
    assert result.drift_share < 0.5
    assert set(result.columns) == {"label", "text_length", "oov_share"}  # text is off by default
    for column in result.columns.values():
        assert set(column) >= {"drifted", "score", "method"}
        assert isinstance(column["drifted"], bool) and isinstance(column["score"], float) and column["method"]
    assert Path(result.report_path).is_file()
    assert leftovers(folder) == []


def test_clearly_drifted_version_drifts_and_writes_the_report(drifted_result):
    folder, result = drifted_result
    assert result.drifted
    assert result.drift_share == pytest.approx(1.0)
    assert all(c["drifted"] for c in result.columns.values())
    report = Path(result.report_path)
    assert report.is_file() and report.stat().st_size > 10_000
    assert b"<html" in report.read_bytes()[:2000].lower()
    assert leftovers(folder) == []
    (check,) = check_data_drift(result, GateConfig())
    assert not check.passed and "3 of 3 columns drifted" in check.detail


def test_max_drift_share_sets_the_decision(previous, tmp_path):
    # only the labels move: 1 of 3 columns drifts, which is drift at 0.3 but not at 0.5
    current = make_version(seed=4, weights=(9, 1))
    loose = detect_drift(previous, current, tmp_path / "loose.html", DriftConfig(max_drift_share=0.5))
    strict = detect_drift(previous, current, tmp_path / "strict.html", DriftConfig(max_drift_share=0.3))
    assert loose.columns["label"]["drifted"]
    assert loose.drift_share == pytest.approx(1 / 3)
    assert not loose.drifted and strict.drifted


def test_oov_share_is_measured_alike_on_both_sides(previous):
    reference, current = drift_frames(
        [*previous.train, *previous.test], [*make_version(seed=2).train, *make_version(seed=2).test]
    )
    assert list(reference.columns) == ["text", "label", "text_length", "oov_share"]
    assert str(reference["text_length"].dtype) == "float64"
    # leave-one-out on the reference: its rows are not all 0 just because they built the vocabulary
    assert current["oov_share"].mean() > 0.05
    assert abs(reference["oov_share"].mean() - current["oov_share"].mean()) < 0.05


def test_oov_shares_counts_words_missing_from_the_reference():
    df = document_frequency(["a b", "b c"])
    assert oov_shares(["a b d", "", "x y"], df) == [pytest.approx(1 / 3), 0.0, 1.0]
    # leave-one-out: "a" and "c" occur in one reference text only
    assert oov_shares(["a b", "b c"], df, leave_one_out=True) == [0.5, 0.5]


def test_new_task_gets_a_descriptive_report_and_is_not_gated(tmp_path):
    result = describe_new_task(make_version(seed=5, task_id="brand_new"), tmp_path / "new.html")
    assert result.drifted is False and result.has_reference is False
    assert result.columns == {} and "new task" in result.note
    assert Path(result.report_path).is_file()
    assert leftovers(tmp_path) == []
    (check,) = check_data_drift(result, GateConfig())
    assert check.passed and "not gated" in check.detail


def test_versions_of_different_tasks_or_empty_versions_are_refused(previous, tmp_path):
    with pytest.raises(DriftError, match="two versions of one task"):
        detect_drift(previous, make_version(seed=2, task_id="other"), tmp_path / "x.html")
    empty = TaskData(task_id="reviews", labels=["pos", "neg"], train=[], test=[])
    with pytest.raises(DriftError, match="no records"):
        detect_drift(previous, empty, tmp_path / "x.html")
    assert list(tmp_path.iterdir()) == []


def test_extractor_reads_tests_and_falls_back_on_scores():
    snapshot = {
        "metrics": [
            {
                "id": "m0",
                "config": {"type": "evidently:metric_v2:DriftedColumnsCount"},
                "value": {"share": 0.5},
            },
            {
                "id": "m1",
                "config": {
                    "type": "evidently:metric_v2:ValueDrift",
                    "column": "label",
                    "method": "Z-test p_value",
                },
                "value": 0.01,
            },
            {
                "id": "m2",
                "config": {
                    "type": "evidently:metric_v2:ValueDrift",
                    "column": "text_length",
                    "method": "Wasserstein distance (normed)",
                    "threshold": 0.1,
                },
                "value": 0.02,
            },
            {"id": "m3", "config": {"type": "something:else"}, "value": 1},
            "not a metric",
        ],
        "tests": [{"metric_config": {"metric_id": "m1"}, "status": "FAIL"}],
    }
    columns, share = extract_drift(snapshot)
    assert share == 0.5
    assert columns["label"] == {
        "drifted": True,
        "score": 0.01,
        "method": "Z-test p_value",
        "threshold": pytest.approx(float("nan"), nan_ok=True),
    }
    assert columns["text_length"]["drifted"] is False  # no test: distance 0.02 < 0.1
    assert extract_drift({}) == ({}, None)


@pytest.mark.slow
def test_text_column_is_optional(tmp_path):
    # over 1000 rows a side Evidently fits its text classifier once; below, it bootstraps (~25 s here)
    previous, current = make_version(seed=1, n=1000), make_version(seed=3, n=1000, vocab=OTHER_VOCAB)
    result = detect_drift(previous, current, tmp_path / "text.html", include_text=True)
    assert "text" in result.columns and result.columns["text"]["drifted"]

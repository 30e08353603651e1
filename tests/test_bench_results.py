"""The committed benchmark results are claims: each figure must follow from the per-record results kept beside it.

The chain checked here: each stored run file (bench/results/runs/) -> the run in its results JSON -> the run's
figures (its final accuracy row from its per-record marks, ACC/BWT/FWT from its matrix) -> the JSON's summary
and paired tables (moecl.metrics on those runs) -> the markdown report (bench.report on that JSON).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report
from bench.params import file_stem, get_preset, method_params, model_config
from bench.runs import run_key
from moecl import metrics

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# The reports the README and bench/README cite as the current figures. The other files in bench/results are
# kept as they were written, by earlier versions of the bench, and say so by their command and date.
CURRENT = ("cpu", "cpu-ablation", "cpu-cost", "cpu-dev", "cpu-full")


def _load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return json.loads(path.read_text(encoding="utf-8"))


def _same(computed, stored) -> bool:
    """Equal once through JSON, as the results file holds it."""
    return json.loads(json.dumps(computed, default=str)) == stored


@pytest.mark.parametrize("name", CURRENT)
def test_each_run_follows_from_its_per_record_marks(name: str) -> None:
    for run in _load(name)["runs"]:
        m = run["metrics"]
        final = dict(zip(m["order"], m["matrix"][-1]))
        for task, marks in run["correct"].items():
            assert final[task] == pytest.approx(marks.count("1") / len(marks)), (name, metrics.run_label(run))
        recomputed = metrics.ContinualMetrics.from_dict(m).as_dict()
        # the joint row has no forgetting or transfer to measure (None by design)
        for figure in ("acc",) if run["order"] == "joint" else ("acc", "bwt", "fwt"):
            assert recomputed[figure] == run[figure], (name, run["method"], metrics.run_label(run), figure)


@pytest.mark.parametrize("name", CURRENT)
def test_each_reused_run_is_its_stored_run_file(name: str) -> None:
    result = _load(name)
    runs_dir = REPO / result["selected"]["runs_dir"]
    for run in (r for r in result["runs"] if r.get("reused")):
        order, seed = run["order"], metrics.run_seed(run)
        path = runs_dir / f"{file_stem(run['method'])}.{run['mode']}.{order}.s{seed}.json"
        stored = json.loads(path.read_text(encoding="utf-8"))["run"]
        assert stored == {k: v for k, v in run.items() if k != "reused"}, path


@pytest.mark.parametrize("name", CURRENT)
def test_summary_and_paired_tables_recompute_from_the_runs(name: str) -> None:
    result = _load(name)
    if not result["runs"]:
        assert result["cost"], f"{name}: neither runs nor cost figures"
        return
    shown = list(next(iter(result["summary"].values())))
    sizes = {mode: {t: d["test"] for t, d in tasks.items()} for mode, tasks in result["data"].items()}
    assert _same(metrics.summarise_runs(result["runs"], sizes, shown), result["summary"]), name
    refs = report.references(result["runs"], shown, name.endswith("-ablation"))
    assert _same(metrics.paired_comparisons(result["runs"], refs, shown), result["paired"]), name
    assert _same(metrics.instrument_check(result["runs"]), result["instrument"]), name


@pytest.mark.parametrize("name", CURRENT)
def test_the_markdown_report_is_its_json_rendered(name: str) -> None:
    result = _load(name)
    assert report.markdown(result) == (RESULTS / f"{name}.md").read_text(encoding="utf-8"), name


def test_stored_runs_keep_their_keys() -> None:
    """The committed runs are found again: each one's key, rebuilt from today's presets and rows with the data
    hashes and backbone it recorded, is the key it was stored under."""
    files = sorted(RESULTS.glob("runs/*/*.json"))
    if not files:
        pytest.skip("no stored runs")
    for path in files:
        stored = json.loads(path.read_text())
        run, context = stored["run"], stored["context"]
        preset = get_preset(path.parent.name.removesuffix("-dev"))
        params = method_params(
            preset, run["method"], run["mode"], model_config(preset, REPO / "params.yaml"), run["seed"]
        )
        key = run_key(params.to_dict(), run["tasks"], context["data"], context["base"], preset["device"])
        assert key == stored["key"], path

"""DVC plot data and PNGs from a ContinualMetrics."""

import json
from pathlib import Path

import pytest

from moecl.metrics import ContinualMetrics
from moecl.plots import (
    DVC_PLOTS_SPEC,
    HEATMAP_TEMPLATE,
    PLOT_NAMES,
    dvc_plots_spec,
    write_dvc_templates,
    write_plots,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

METRICS = ContinualMetrics(
    order=["agnews", "yelp", "amazon"],
    matrix=[
        {"agnews": 0.9, "yelp": 0.3},
        {"agnews": 0.8, "yelp": 0.85, "amazon": 0.4},
        {"agnews": 0.7, "yelp": 0.8, "amazon": 0.9},
    ],
)


def load(path: Path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def plots_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "plots"
    return folder, write_plots(METRICS, folder)


def test_write_plots_writes_every_file(plots_dir):
    folder, written = plots_dir
    assert set(written) == set(PLOT_NAMES)
    for name, paths in written.items():
        assert paths["data"] == folder / f"{name}.json"
        assert paths["image"] == folder / f"{name}.png"
        assert paths["image"].read_bytes()[:8] == PNG_MAGIC
        assert isinstance(load(paths["data"]), list)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"{n}.{ext}" for n in PLOT_NAMES for ext in ("json", "png"))  # no temp files left


def test_accuracy_matrix_records(plots_dir):
    records = load(plots_dir[1]["accuracy_matrix"]["data"])
    assert len(records) == 8  # the cells that were evaluated
    assert records[0] == {"after": "0:agnews", "step": 0, "task": "agnews", "accuracy": 0.9}
    assert {"after": "2:amazon", "step": 2, "task": "amazon", "accuracy": 0.9} in records
    assert not any(r["after"] == "0:agnews" and r["task"] == "amazon" for r in records)


def test_task_accuracy_records_have_uniform_keys(plots_dir):
    records = load(plots_dir[1]["task_accuracy"]["data"])
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0] == {"step": 0, "agnews": 0.9, "yelp": 0.3, "amazon": None}
    assert records[2] == {"step": 2, "agnews": 0.7, "yelp": 0.8, "amazon": 0.9}


def test_forgetting_records_use_the_metrics_module(plots_dir):
    records = load(plots_dir[1]["forgetting"]["data"])
    by_task = {r["task"]: r["accuracy_change"] for r in records}
    assert by_task == {"agnews": -0.2, "yelp": -0.05, "amazon": 0.0}


def test_repeated_task_rows_follow_steps(tmp_path):
    metrics = ContinualMetrics(
        order=["agnews", "yelp"],
        matrix=[{"agnews": 0.9}, {"agnews": 0.8, "yelp": 0.9}, {"agnews": 0.85, "yelp": 0.7}],
        steps=["agnews", "yelp", "agnews"],
    )
    written = write_plots(metrics, tmp_path)
    afters = [r["after"] for r in load(written["accuracy_matrix"]["data"])]
    assert afters[-1] == "2:agnews"
    forgetting = {r["task"]: r["accuracy_change"] for r in load(written["forgetting"]["data"])}
    assert forgetting == {"agnews": 0.0, "yelp": -0.2}  # agnews was last learned at step 2


def test_empty_metrics_still_give_valid_files(tmp_path):
    written = write_plots(ContinualMetrics(order=[], matrix=[]), tmp_path)
    for paths in written.values():
        assert load(paths["data"]) == []
        assert paths["image"].read_bytes()[:8] == PNG_MAGIC


def test_same_metrics_give_the_same_bytes(plots_dir, tmp_path):
    a = plots_dir[1]
    b = write_plots(METRICS, tmp_path / "b")
    for name in PLOT_NAMES:
        for kind in ("data", "image"):
            assert a[name][kind].read_bytes() == b[name][kind].read_bytes()


def test_dvc_plots_spec_references_the_files():
    files = {next(iter(entry)) for entry in DVC_PLOTS_SPEC}
    assert {"plots/accuracy_matrix.json", "plots/forgetting.json"} <= files
    assert {f"plots/{n}.png" for n in PLOT_NAMES} <= files
    heatmap = next(e for e in DVC_PLOTS_SPEC if "plots/accuracy_matrix.json" in e)[
        "plots/accuracy_matrix.json"
    ]
    assert heatmap == {**heatmap, "template": "moecl_heatmap", "x": "task", "y": "after"}
    lines = next(e for e in dvc_plots_spec(METRICS.order) if "task_accuracy" in e)["task_accuracy"]
    assert lines["x"] == "step" and lines["y"] == {"plots/task_accuracy.json": ["agnews", "yelp", "amazon"]}


def test_heatmap_template_is_installed_for_dvc(tmp_path):
    path = write_dvc_templates(tmp_path / ".dvc" / "plots")
    assert path.name == "moecl_heatmap.json"
    content = load(path)
    assert content == HEATMAP_TEMPLATE
    text = path.read_text()
    for anchor in ("<DVC_METRIC_DATA>", "<DVC_METRIC_X>", "<DVC_METRIC_Y>"):
        assert anchor in text


def test_heatmap_template_renders_with_dvc_render(plots_dir, tmp_path):
    vega = pytest.importorskip("dvc_render.vega")
    records = load(plots_dir[1]["accuracy_matrix"]["data"])
    datapoints = [{**r, "rev": "workspace"} for r in records]
    template_dir = write_dvc_templates(tmp_path / "templates").parent
    renderer = vega.VegaRenderer(
        datapoints,
        "accuracy_matrix",
        template="moecl_heatmap",
        template_dir=str(template_dir),
        x="task",
        y="after",
    )
    filled = renderer.get_filled_template()
    assert filled["spec"]["encoding"]["x"]["field"] == "task"
    assert filled["data"]["values"][0]["accuracy"] == 0.9


def test_method_comparison_draws_the_rows_it_is_given(tmp_path):
    from moecl.plots import draw_method_comparison

    rows = {
        "seq_lora": {"acc": 0.56, "acc_se": 0.02, "bwt": -0.1},
        "mtl": {"acc": 0.63, "acc_se": 0.02, "bwt": None},
    }
    first = draw_method_comparison(rows, tmp_path / "a.png", "t").read_bytes()
    assert first[:8] == PNG_MAGIC
    assert draw_method_comparison(rows, tmp_path / "b.png", "t").read_bytes() == first  # reproducible
    changed = rows | {"seq_lora": rows["seq_lora"] | {"bwt": -0.3}}
    assert draw_method_comparison(changed, tmp_path / "c.png", "t").read_bytes() != first
    assert draw_method_comparison({}, tmp_path / "none.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png", "none.png"]

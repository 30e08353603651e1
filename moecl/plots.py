"""Plots of a continual-learning run: DVC plot data (JSON lists of records) and PNGs, from a ContinualMetrics.

- accuracy_matrix: one record per evaluated cell {"after", "step", "task", "accuracy"}; "after" names the
  row, "<i>:<task trained at step i>" (rows follow metrics.steps, columns metrics.order). DVC's built-in
  `confusion` template COUNTS records per cell and ignores the value, so the heatmap uses our template
  HEATMAP_TEMPLATE (install it into <repo>/.dvc/plots with write_dvc_templates).
- task_accuracy: one record per step {"step": i, "<task>": accuracy or null, ...} (every task in every
  record, so DVC sees uniform keys), for DVC's `linear` template with one y field per task.
- forgetting: one record per task {"task", "accuracy_change"} = metrics.forgetting_per_task: final accuracy
  minus the accuracy right after the task was (last) learned (negative = forgotten).

PNGs are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch) and
saved without a timestamp/version stamp, so the same metrics give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moecl.io import atomic_path, write_json_atomic
from moecl.metrics import ContinualMetrics, forgetting_per_task

PLOT_NAMES = ("accuracy_matrix", "task_accuracy", "forgetting")
HEATMAP_TEMPLATE_NAME = "moecl_heatmap"

# A Vega-Lite heatmap with DVC's anchors: cells coloured by the record's "accuracy", one column per revision.
HEATMAP_TEMPLATE: dict[str, Any] = {
    "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
    "data": {"values": "<DVC_METRIC_DATA>"},
    "title": "<DVC_METRIC_TITLE>",
    "facet": {"column": {"field": "rev", "sort": []}},
    "spec": {
        "width": "<DVC_METRIC_PLOT_WIDTH>",
        "height": "<DVC_METRIC_PLOT_HEIGHT>",
        "encoding": {
            "x": {
                "field": "<DVC_METRIC_X>",
                "type": "nominal",
                "sort": None,
                "title": "<DVC_METRIC_X_LABEL>",
            },
            "y": {
                "field": "<DVC_METRIC_Y>",
                "type": "nominal",
                "sort": None,
                "title": "<DVC_METRIC_Y_LABEL>",
            },
        },
        "layer": [
            {
                "mark": "rect",
                "encoding": {
                    "color": {
                        "field": "accuracy",
                        "type": "quantitative",
                        "scale": {"domain": [0, 1], "scheme": "viridis"},
                    },
                    "tooltip": [
                        {"field": "<DVC_METRIC_Y>", "type": "nominal"},
                        {"field": "<DVC_METRIC_X>", "type": "nominal"},
                        {"field": "accuracy", "type": "quantitative", "format": ".3f"},
                    ],
                },
            },
            {
                "mark": "text",
                "encoding": {
                    "text": {"field": "accuracy", "type": "quantitative", "format": ".2f"},
                    "color": {
                        "condition": {"test": "datum.accuracy < 0.5", "value": "white"},
                        "value": "black",
                    },
                },
            },
        ],
    },
}


def dvc_plots_spec(tasks: Sequence[str] | None = None, plots_dir: str = "plots") -> list[dict[str, Any]]:
    """The `plots:` section of a dvc.yaml for write_plots' files.

    DVC's linear template draws one y field per listed name, and DVC cannot take "every field": with
    `tasks` the interactive per-task lines are included; without them that plot is shown as its PNG only.
    """
    spec: list[dict[str, Any]] = [
        {
            f"{plots_dir}/accuracy_matrix.json": {
                "template": HEATMAP_TEMPLATE_NAME,
                "x": "task",
                "y": "after",
                "title": "Accuracy on each task (columns) after each training step (rows)",
            }
        },
        {
            f"{plots_dir}/forgetting.json": {
                "template": "bar_horizontal",
                "x": "accuracy_change",
                "y": "task",
                "title": "Final minus just-learned accuracy (negative = forgotten)",
            }
        },
    ]
    if tasks:
        spec.append(
            {
                "task_accuracy": {
                    "template": "linear",
                    "x": "step",
                    "y": {f"{plots_dir}/task_accuracy.json": list(tasks)},
                    "y_label": "accuracy",
                    "title": "Accuracy of each task across training steps",
                }
            }
        )
    spec += [{f"{plots_dir}/{name}.png": {}} for name in PLOT_NAMES]
    return spec


DVC_PLOTS_SPEC: list[dict[str, Any]] = dvc_plots_spec()


def write_dvc_templates(templates_dir: str | Path = ".dvc/plots") -> Path:
    """Install HEATMAP_TEMPLATE where DVC looks up templates by name (<repo>/.dvc/plots by default)."""
    return write_json_atomic(Path(templates_dir) / f"{HEATMAP_TEMPLATE_NAME}.json", HEATMAP_TEMPLATE)


# --- records ----------------------------------------------------------------------------------------------


def _value(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), 6)


def _step_labels(metrics: ContinualMetrics) -> list[str]:
    """One label per matrix row, "<i>:<task trained at step i>" (a task may be trained again at a later step)."""
    steps = metrics.steps or []
    return [f"{i}:{steps[i] if i < len(steps) else '?'}" for i in range(len(metrics.matrix))]


def accuracy_matrix_records(metrics: ContinualMetrics) -> list[dict[str, Any]]:
    labels = _step_labels(metrics)
    return [
        {"after": labels[i], "step": i, "task": task, "accuracy": _value(row[task])}
        for i, row in enumerate(metrics.matrix)
        for task in metrics.order
        if task in row and _value(row[task]) is not None
    ]


def task_accuracy_records(metrics: ContinualMetrics) -> list[dict[str, Any]]:
    return [
        {"step": i, **{t: _value(row.get(t)) for t in metrics.order}} for i, row in enumerate(metrics.matrix)
    ]


def forgetting_records(metrics: ContinualMetrics) -> list[dict[str, Any]]:
    change = forgetting_per_task(metrics.matrix, metrics.steps or metrics.order)
    return [{"task": t, "accuracy_change": _value(change[t])} for t in metrics.order if t in change]


# --- images -----------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _save_png(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return path


def draw_accuracy_matrix(metrics: ContinualMetrics, path: Path) -> Path:
    import numpy as np

    order, matrix = metrics.order, metrics.matrix
    fig = _figure(max(5.0, 2.4 + 0.9 * len(order)), max(3.0, 1.6 + 0.6 * len(matrix)))
    ax = fig.add_subplot()
    if not matrix or not order:
        _no_data(ax, "accuracy matrix")
        return _save_png(fig, path)
    grid = np.array([[_value(row.get(t)) for t in order] for row in matrix], dtype=float)  # None -> nan
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(
                j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.5 else "black", fontsize=8
            )
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), [f"after {label}" for label in _step_labels(metrics)])
    ax.set_xlabel("evaluated task")
    ax.set_title(f"Accuracy matrix\nACC {metrics.acc:.3f}, BWT {metrics.bwt:+.3f}", fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy")
    return _save_png(fig, path)


def draw_task_accuracy(metrics: ContinualMetrics, path: Path) -> Path:
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    records = task_accuracy_records(metrics)
    if not records:
        _no_data(ax, "accuracy")
        return _save_png(fig, path)
    steps = [r["step"] for r in records]
    for task in metrics.order:
        ys = [r[task] if r[task] is not None else float("nan") for r in records]
        ax.plot(steps, ys, marker="o", label=task)
    ax.set_xticks(steps, _step_labels(metrics), rotation=30, ha="right")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("after training step")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy of each task across training steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save_png(fig, path)


def draw_forgetting(metrics: ContinualMetrics, path: Path) -> Path:
    fig = _figure(max(5.0, 1.5 + 0.8 * len(metrics.order)), 3.6)
    ax = fig.add_subplot()
    records = forgetting_records(metrics)
    if not records:
        _no_data(ax, "forgetting")
        return _save_png(fig, path)
    values = [r["accuracy_change"] or 0.0 for r in records]
    ax.bar([r["task"] for r in records], values, color=["#d62728" if v < 0 else "#2ca02c" for v in values])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("final - just-learned accuracy")
    ax.set_title("Forgetting per task (negative = forgotten)", fontsize=10)
    ax.tick_params(axis="x", labelrotation=30)
    return _save_png(fig, path)


def draw_method_comparison(rows: dict[str, dict], path: Path, title: str = "") -> Path:
    """Methods side by side: ACC with its standard error, and BWT. `rows`: label -> {"acc", "acc_se", "bwt"}
    (means over a method's runs; None where a figure does not apply, e.g. BWT of a joint upper bound)."""
    fig = _figure(max(6.4, 2.0 + 0.9 * len(rows)), 3.8)
    acc_ax, bwt_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if not rows:
        _no_data(acc_ax, "results")
        _no_data(bwt_ax, "results")
        return _save_png(fig, path)
    labels, positions = list(rows), range(len(rows))
    acc = [_value(r.get("acc")) or 0.0 for r in rows.values()]
    se = [_value(r.get("acc_se")) or 0.0 for r in rows.values()]
    bars = acc_ax.bar(positions, acc, yerr=se, capsize=3, color="#1f77b4")
    acc_ax.bar_label(bars, [f"{v:.3f}" for v in acc], fontsize=7, padding=4)
    acc_ax.set_ylim(0.0, 1.0)
    acc_ax.set_ylabel("ACC (final mean accuracy) ± s.e.")
    bwt = [_value(r.get("bwt")) for r in rows.values()]
    colours = ["#d62728" if (v or 0.0) < 0 else "#2ca02c" for v in bwt]
    bars = bwt_ax.bar(positions, [v or 0.0 for v in bwt], color=colours)
    bwt_ax.bar_label(bars, ["n/a" if v is None else f"{v:+.3f}" for v in bwt], fontsize=7)
    bwt_ax.axhline(0.0, color="black", linewidth=0.8)
    bwt_ax.set_ylabel("BWT (negative = forgotten)")
    for ax in (acc_ax, bwt_ax):
        ax.set_xticks(positions, labels, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_png(fig, path)


# --- all of it --------------------------------------------------------------------------------------------


def write_plots(metrics: ContinualMetrics, plots_dir: str | Path) -> dict[str, dict[str, Path]]:
    """Write <plots_dir>/{accuracy_matrix,task_accuracy,forgetting}.{json,png}, each atomically.

    Returns {name: {"data": json path, "image": png path}}.
    """
    out = Path(plots_dir)
    builders = {
        "accuracy_matrix": (accuracy_matrix_records, draw_accuracy_matrix),
        "task_accuracy": (task_accuracy_records, draw_task_accuracy),
        "forgetting": (forgetting_records, draw_forgetting),
    }
    written: dict[str, dict[str, Path]] = {}
    for name, (records, draw) in builders.items():
        data = write_json_atomic(out / f"{name}.json", records(metrics))
        image = draw(metrics, out / f"{name}.png")
        written[name] = {"data": data, "image": image}
    return written

"""The smoke benchmark end to end: every method, both modes, two orders and the cost figures, in seconds."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from bench.params import PRESETS, parse_variant

METHODS = PRESETS["smoke"]["methods"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path]:
    from bench.run import main

    out = tmp_path_factory.mktemp("bench")
    assert main(["--preset", "smoke", "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "smoke.json").read_text()), out


def _is_score(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value) and -1.0 <= value <= 1.0


def test_every_method_mode_and_order_ran(smoke) -> None:
    result, _ = smoke
    assert result["finished"] and not result["errors"]
    runs = {(r["method"], r["mode"], r["order"]) for r in result["runs"]}
    for mode in ("classifier", "instruction"):
        for method in METHODS:
            orders = ["joint"] if method == "mtl" else list(PRESETS["smoke"]["orders"])
            assert {(method, mode, o) for o in orders} <= runs


def test_metrics_matrices_and_zero_shot(smoke) -> None:
    result, _ = smoke
    for run in result["runs"]:
        m = run["metrics"]
        assert _is_score(run["acc"]) and run["acc"] >= 0
        if run["method"] == "mtl":
            assert run["bwt"] is None and run["fwt"] is None and len(m["matrix"]) == 1
            continue
        assert _is_score(run["bwt"]) and _is_score(run["fwt"])
        tasks = run["tasks"]
        assert m["order"] == tasks and len(m["matrix"]) == len(tasks)
        # Only the cells the metrics read: the diagonal after each step, every task after the last.
        for i, row in enumerate(m["matrix"][:-1]):
            assert [cell is not None for cell in row] == [j == i for j in range(len(tasks))]
        assert all(_is_score(cell) for cell in m["matrix"][-1])
        assert set(m["before_training"]) == set(tasks) == set(m["zero_shot"])
    # Instruction mode: the untrained model's answers do not depend on the method, so b_i is shared.
    shared = [
        r["metrics"]["zero_shot"]
        for r in result["runs"]
        if r["mode"] == "instruction" and r["order"] != "joint"
    ]
    assert len(shared) > 1 and all(b == shared[0] for b in shared)


def test_summary_has_mean_and_spread(smoke) -> None:
    result, _ = smoke
    for mode in ("classifier", "instruction"):
        for method in METHODS:
            s = result["summary"][mode][method]
            assert s["acc"]["n"] == (1 if method == "mtl" else len(PRESETS["smoke"]["orders"]))
            assert s["acc"]["mean"] is not None
            if method != "mtl":
                assert s["acc"]["std"] is not None and s["bwt"]["mean"] is not None
            runs = [r for r in result["runs"] if r["mode"] == mode and r["method"] == method]
            n = {t: d["test"] for t, d in result["data"][mode].items()}
            by_run = [
                math.sqrt(sum(p * (1 - p) / n[t] for t, p in r["metrics"]["per_task"].items())) / len(n)
                for r in runs
            ]
            assert s["acc_se"] == pytest.approx(sum(by_run) / len(by_run), abs=1e-5)


def test_runs_keep_per_record_correctness_and_pair_with_moecl(smoke) -> None:
    result, out = smoke
    runs = {(r["mode"], r["method"], r["order"]): r for r in result["runs"]}
    for (mode, _method, _order), run in runs.items():
        sizes = {t: d["test"] for t, d in result["data"][mode].items()}
        assert {t: len(c) for t, c in run["correct"].items()} == sizes
        # the per-record marks are the accuracies of the final row
        for task, marks in run["correct"].items():
            assert run["metrics"]["per_task"][task] == pytest.approx(marks.count("1") / len(marks))
    assert set(result["paired"]) == {"moecl", "moecl+replay", "mtl"}
    for mode, others in result["paired"]["mtl"].items():  # the upper bound's joint run against each row's
        assert set(others) == set(METHODS) - {"mtl"}
        for other, c in others.items():
            assert c["orders"] == ["order1/s42", "order2/s42"]  # labelled by the other row's runs
            mtl_acc = runs[(mode, "mtl", "joint")]["acc"]
            by_run = [mtl_acc - runs[(mode, other, o)]["acc"] for o in ("order1", "order2")]
            assert [d["diff"] for d in c["by_run"].values()] == pytest.approx(by_run, abs=1e-5)
    for mode, others in result["paired"]["moecl"].items():
        assert set(others) == set(METHODS) - {"moecl"}
        for other, c in others.items():
            orders = ["order1", "order2"]
            assert c["orders"] == [f"{o}/s42" for o in orders]
            diffs = [
                runs[(mode, "moecl", o)]["acc"] - runs[(mode, other, "joint" if other == "mtl" else o)]["acc"]
                for o in orders
            ]
            assert c["diff"]["mean"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-5)
            assert c["se"] >= 0 and c["records"] == 2 * sum(
                result["data"][mode][t]["test"] for t in runs[(mode, "moecl", "order1")]["correct"]
            )
    text = (out / "smoke.md").read_text()
    assert "## moecl (no replay) against each row, record by record" in text
    assert "## moecl (best) against each row, record by record" in text
    assert "## mtl against each row, record by record" in text
    for mode in ("classifier", "instruction"):  # the figure of every mode, linked from the tables
        assert (out / f"smoke-{mode}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"![ACC and BWT of each row](smoke-{mode}.png)" in text


def test_moecl_runs_report_their_gate_routing(smoke) -> None:
    result, out = smoke
    for run in result["runs"]:
        if parse_variant(run["method"])["name"] in ("moecl", "moecl_nogan"):
            assert set(run["routing"]) == set(run["tasks"])
            for cell in run["routing"].values():
                assert 0.0 < cell["min"] <= cell["mean"] <= cell["max"] < 1.0
        else:
            assert run["routing"] == {}  # no gate to read
    assert "## The gate: weight on each task's own expert" in (out / "smoke.md").read_text()


def test_a_failing_routing_probe_does_not_cost_the_run(tmp_path, monkeypatch, capsys) -> None:
    import bench.runs
    from bench.run import main

    def broken(*args, **kwargs):
        raise RuntimeError("probe broke")

    monkeypatch.setattr(bench.runs, "final_routing", broken)
    argv = ["--preset", "smoke", "--methods", "moecl", "--modes", "classifier", "--orders", "order1"]
    assert main(argv + ["--no-cost", "--out", str(tmp_path), "--quiet"]) == 0
    result = json.loads((tmp_path / "smoke.json").read_text())
    (run,) = result["runs"]
    assert not result["errors"] and run["acc"] is not None and run["routing"] == {}
    assert "routing probe failed" in capsys.readouterr().err


def test_cost_figures(smoke) -> None:
    result, _ = smoke
    cost = result["cost"]
    for mode in ("classifier", "instruction"):
        rows = {r["method"]: r for r in cost["modes"][mode]}
        assert set(rows) == set(METHODS) - {"mtl"}
        assert rows["seq_lora"]["train_step_vs_seq_lora"] == 1.0
        assert rows["per_task_lora"]["latency_vs_per_task_lora"] == 1.0
        repeats = cost["settings"]["repeats"]
        for r in rows.values():
            assert r["train_step_s"] > 0 and r["latency_ms_per_sample"] > 0 and r["peak_memory_mb"] > 0
            assert r["train_step_timing"] == "interleaved" and len(r["train_step_all_s"]) == repeats
            assert r["latency_timing"] == "interleaved" and r["latency_ms_batch1"] > 0
        # moecl_mem's batches carry the discriminator-memory rows
        assert rows["moecl_mem"]["batch_rows"] > rows["moecl"]["batch_rows"]
    scaling = cost["scaling"]["moecl"]["points"]
    assert [p["tasks"] for p in scaling] == [1, 4, 16, 64]
    assert scaling[0]["vs_first"] == 1.0 and all(p["train_step_timing"] == "interleaved" for p in scaling)


def test_row_labels_name_the_longest_labelled_head() -> None:
    from bench.params import label

    assert label("moecl+replay") == "moecl (best)"
    assert label("moecl+replay+memory") == "moecl (best)+memory"  # not "moecl (no replay)+replay+memory"
    assert label("moecl+shared_lr") == "moecl (no replay)+shared_lr"
    assert label("moecl_paper+orth") == "moecl (paper)+orth"
    assert label("seq_lora+replay") == "seq_lora+replay" and label("moecl_mem") == "moecl_mem"


def test_cost_batches_of_a_replaying_method_carry_earlier_tasks_rows(tiny_base) -> None:
    """A +replay step trains on rows of earlier tasks too (routed to their own experts): its timed batches must
    hold them, or the cost table would time the cheap single-task step."""
    from bench.cost import Stepper
    from bench.params import get_preset

    preset = get_preset("smoke")
    tasks = {
        method: [set(batch.tasks) for batch in Stepper(tiny_base, preset, method, "classifier", 3).batches]
        for method in ("moecl", "moecl+replay", "seq_lora+replay")
    }
    assert all(t == {"s2"} for t in tasks["moecl"])
    assert all(t == {"s0", "s1", "s2"} for t in tasks["moecl+replay"] + tasks["seq_lora+replay"])


def test_run_record_and_markdown(smoke) -> None:
    result, out = smoke
    assert result["command"].startswith("python -m bench.run")
    assert result["hardware"]["torch"] and result["hardware"]["cpu_count"]
    assert result["config"]["name"] == "smoke" and result["wall_seconds"] > 0
    text = (out / "smoke.md").read_text()
    for heading in (
        "## Accuracy (ACC)",
        "## Accuracy matrices",
        "## Cost",
        "Step time against the number of tasks",
    ):
        assert heading in text


def test_missing_data_is_skipped_with_a_reason(tmp_path, capsys) -> None:
    from bench.run import main

    assert (
        main(["--preset", "cpu", "--data", str(tmp_path / "absent"), "--out", str(tmp_path), "--quiet"]) == 0
    )
    err = capsys.readouterr().err
    assert "SKIPPED" in err and "mtl5" in err and str(tmp_path / "absent") in err
    assert not list(tmp_path.glob("*.json"))


def test_time_budget_lists_what_did_not_run(tmp_path) -> None:
    from bench.run import main

    assert (
        main(["--preset", "smoke", "--budget-minutes", "0", "--no-cost", "--out", str(tmp_path), "--quiet"])
        == 0
    )
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["finished"] and not result["runs"] and result["cost"] is None
    assert len(result["not_run"]) == 2 * (len(METHODS) - 1) * len(PRESETS["smoke"]["orders"]) + 2
    assert "Not run (time budget" in (tmp_path / "smoke.md").read_text()


def test_tasks_flag_keeps_those_tasks_in_each_orders_sequence(tmp_path) -> None:
    from bench.run import main

    argv = [
        "--preset",
        "smoke",
        "--methods",
        "per_task_lora",
        "--modes",
        "classifier",
        "--no-cost",
        "--quiet",
    ]
    assert main([*argv, "--tasks", "spam", "topic", "--max-length", "40", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "smoke-slice.json").read_text())
    assert {r["order"]: r["tasks"] for r in result["runs"]} == {
        "order1": ["topic", "spam"],
        "order2": ["spam", "topic"],
    }
    assert result["config"]["modes"]["classifier"]["train"]["max_length"] == 40
    with pytest.raises(SystemExit, match="unknown tasks: weather"):
        main([*argv, "--tasks", "weather", "--out", str(tmp_path)])


def test_device_flag_runs_everything_on_the_cpu(tmp_path, monkeypatch) -> None:
    from bench.run import main

    monkeypatch.setenv(
        "CUDA_VISIBLE_DEVICES", "0"
    )  # recorded, so what --device cpu sets is undone afterwards
    argv = ["--preset", "smoke", "--methods", "per_task_lora", "--modes", "classifier", "--tasks", "spam"]
    assert main([*argv, "--device", "cpu", "--no-cost", "--quiet", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "smoke-slice.json").read_text())  # --tasks resizes: a slice
    assert result["config"]["device"] == "cpu" and "--device cpu" in result["command"]
    assert result["runs"] and not result["errors"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # the library sees no GPU, so it trains where the base is


def test_per_task_lora_never_forgets(smoke) -> None:
    """Isolated experts: every earlier task scores after the last step exactly what it scored when learned."""
    result, _ = smoke
    runs = [r for r in result["runs"] if r["method"] == "per_task_lora"]
    assert runs
    for run in runs:
        assert run["bwt"] == 0.0
        matrix = run["metrics"]["matrix"]
        assert all(matrix[-1][i] == matrix[i][i] for i in range(len(matrix) - 1))


def test_a_rerun_reuses_stored_runs_and_recomputes_them_identically(tmp_path) -> None:
    """Each finished run has its own file; a rerun with the same settings reads it back instead of running
    again, a changed setting runs afresh, and --rerun recomputes the same figures (seeded)."""
    from bench.run import main

    argv = [
        "--preset",
        "smoke",
        "--methods",
        "seq_lora",
        "moecl",
        "--modes",
        "instruction",
        "--orders",
        "order1",
    ]
    argv += ["--no-cost", "--quiet", "--out", str(tmp_path)]
    assert main(argv) == 0
    first = json.loads((tmp_path / "smoke.json").read_text())
    stored = sorted(p.name for p in (tmp_path / "runs" / "smoke").iterdir())
    assert stored == ["moecl.instruction.order1.s42.json", "seq_lora.instruction.order1.s42.json"]
    assert main(argv) == 0
    second = json.loads((tmp_path / "smoke.json").read_text())
    assert [r.get("reused") for r in second["runs"]] == [True, True]
    assert [r["correct"] for r in second["runs"]] == [r["correct"] for r in first["runs"]]
    assert main([*argv, "--rerun"]) == 0
    third = json.loads((tmp_path / "smoke.json").read_text())
    assert not any(r.get("reused") for r in third["runs"])
    assert [(r["acc"], r["correct"]) for r in third["runs"]] == [
        (r["acc"], r["correct"]) for r in first["runs"]
    ]
    assert main([*argv, "--seeds", "7"]) == 0  # another training seed: new runs beside the stored ones
    fourth = json.loads((tmp_path / "smoke.json").read_text())
    new = [r for r in fourth["runs"] if not r.get("reused")]
    assert [(r["method"], r["seed"]) for r in new] == [("seq_lora", 7), ("moecl", 7)]
    assert len(list((tmp_path / "runs" / "smoke").iterdir())) == 4
    # the results aggregate every stored run of the preset's rows, not only the ones this invocation ran
    assert fourth["summary"]["instruction"]["seq_lora"]["runs"] == ["order1/s42", "order1/s7"]
    assert main([*argv[:2], "--methods", "moecl", *argv[5:], "--seeds", "7"]) == 0
    fifth = json.loads((tmp_path / "smoke.json").read_text())
    assert fifth["summary"]["instruction"]["seq_lora"]["runs"] == [
        "order1/s42"
    ]  # stored, at the preset's seeds
    assert fifth["summary"]["instruction"]["moecl"]["runs"] == ["order1/s42", "order1/s7"]
    assert (
        all(r.get("reused") for r in fifth["runs"])
        and "ACC of each run" in (tmp_path / "smoke.md").read_text()
    )


def test_dev_split_scores_on_training_records_the_run_does_not_train_on(tmp_path) -> None:
    from bench.tasks import find_mtl5, load_mtl5

    try:
        root = find_mtl5()
    except Exception:  # noqa: BLE001 - the benchmark data is third-party and may be absent
        pytest.skip("mtl5 data absent")
    test = load_mtl5(root, ["agnews"], 4, 20, 42)["agnews"]
    dev = load_mtl5(root, ["agnews"], 4, 20, 42, split="dev")["agnews"]
    assert [r.text for r in dev.train] == [r.text for r in test.train]
    trained = {r.text for r in dev.train}
    test_texts = {r.text for r in test.test}
    assert len(dev.test) == 20 and not trained & {r.text for r in dev.test}
    assert not test_texts & {r.text for r in dev.test}


def test_presets_build_valid_params_for_every_row() -> None:
    from bench.params import get_preset, method_params

    for name in PRESETS:
        preset = get_preset(name)
        for method in {*preset["methods"], *preset["ablation"]}:
            for mode in preset["modes"]:
                params = method_params(preset, method, mode, seed=7)
                assert params.method.mode == mode and params.train.seed == 7
        for mode in preset["cost"]["modes"]:  # the cost figures may time a mode the preset does not train
            for method in preset["cost"].get("scaling_methods", []):
                assert method_params(preset, method, mode).method.mode == mode
    cpu = method_params(get_preset("cpu"), "seq_lora+replay", "instruction")
    assert (cpu.train.lr, cpu.train.max_length, cpu.train.threads, cpu.method.replay_per_task) == (
        5e-4,
        128,
        2,
        16,
    )
    # the cpu preset's `moecl+replay` row is the library's defaults exactly; `moecl` is them without replay
    import dataclasses

    from moecl.config import MethodConfig

    best = method_params(get_preset("cpu"), "moecl+replay", "instruction").method
    assert best == dataclasses.replace(MethodConfig(), mode="instruction")
    plain = method_params(get_preset("cpu"), "moecl", "instruction").method
    assert plain == dataclasses.replace(best, replay_per_task=0)
    knob = method_params(get_preset("smoke"), "moecl_paper+shared_lr=0.1", "classifier").method
    assert knob.shared_lr_scale == 0.1 and not knob.paper and knob.gate_bias == 0.0  # the paper plus one knob


def test_an_ablation_pairs_every_knob_with_the_papers_setting(tmp_path) -> None:
    from bench.run import main

    argv = ["--preset", "smoke", "--ablation", "--methods", "moecl_paper", "moecl_paper+gate_bias", "moecl"]
    argv += ["--modes", "instruction", "--orders", "order1", "--no-cost", "--quiet", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "smoke-ablation.json").read_text())
    assert list(result["paired"]) == ["moecl_paper", "moecl"]
    assert set(result["paired"]["moecl_paper"]["instruction"]) == {"moecl_paper+gate_bias", "moecl"}
    assert (
        "## moecl (paper) against each row, record by record" in (tmp_path / "smoke-ablation.md").read_text()
    )


def test_the_paired_tables_reference_the_best_rows_that_ran_else_the_first_moecl_row() -> None:
    from bench.report import references

    def run(method, correct=True):
        return {"method": method, "correct": {"t": "1"} if correct else {}}

    shown = ["seq_lora", "moecl_paper", "moecl", "moecl+replay"]
    runs = [run("seq_lora"), run("moecl_paper"), run("moecl"), run("moecl+replay")]
    assert references(runs, shown) == ["moecl", "moecl+replay"]
    assert references(runs, shown, ablation=True) == ["moecl_paper", "moecl"]
    # neither best row ran (or ran without per-record marks): the first moecl row in the table's order
    assert references([run("seq_lora"), run("moecl_paper"), run("moecl", correct=False)], shown) == [
        "moecl_paper"
    ]
    assert references([run("seq_lora")], shown) == []

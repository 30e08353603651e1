import math

import pytest

from moecl.metrics import (
    ContinualMetrics,
    acc,
    accuracy,
    bwt,
    correctness,
    forgetting_per_task,
    fwt,
    normalize_answer,
    paired_acc_difference,
    stripping_rate,
)

ORDER = ["a", "b", "c"]
# R[i][j]: row = after step i, column = task j
MATRIX = [
    {"a": 0.90},
    {"a": 0.80, "b": 0.70},
    {"a": 0.60, "b": 0.65, "c": 0.50},
]


def marked_run(method: str, marks: str, seed: int = 42, order: str | None = None) -> dict:
    """A run with per-record correctness marks on one task: mtl's run is joint, another row's on order1 unless
    `order` says otherwise."""
    order = order or ("joint" if method == "mtl" else "order1")
    return {"method": method, "mode": "instruction", "order": order, "seed": seed, "correct": {"t": marks}}


def test_acc_is_mean_of_last_row():
    assert acc(MATRIX, ORDER) == pytest.approx((0.60 + 0.65 + 0.50) / 3)


def test_bwt_hand_computed():
    # ((0.60 - 0.90) + (0.65 - 0.70)) / 2
    assert bwt(MATRIX, ORDER) == pytest.approx(-0.175)


def test_fwt_hand_computed():
    before = {"a": 0.3, "b": 0.40, "c": 0.30}
    zero = {"a": 0.3, "b": 0.25, "c": 0.20}
    # ((0.40 - 0.25) + (0.30 - 0.20)) / 2; the first task does not count
    assert fwt(ORDER, before, zero) == pytest.approx(0.125)


def test_no_forgetting_is_zero_and_single_step_bwt_is_zero():
    flat = [{"a": 0.5}, {"a": 0.5, "b": 0.7}]
    assert bwt(flat, ["a", "b"]) == 0.0
    assert bwt(MATRIX[:1], ORDER) == 0.0


def test_repeated_task_compares_with_its_last_training():
    steps = ["a", "b", "a", "c"]
    rows = [{"a": 0.5}, {"a": 0.4, "b": 0.8}, {"a": 0.9, "b": 0.7}, {"a": 0.85, "b": 0.6, "c": 0.5}]
    # a: 0.85 - 0.9 (its last training is step 2); b: 0.6 - 0.8
    assert bwt(rows, steps) == pytest.approx(((0.85 - 0.9) + (0.6 - 0.8)) / 2)
    m = ContinualMetrics(order=["a", "b", "c"], matrix=rows, steps=steps)
    assert m.as_dict()["matrix"][0] == [0.5, None, None]
    assert forgetting_per_task(rows, steps) == pytest.approx({"a": -0.05, "b": -0.2, "c": 0.0})


def test_continual_metrics_json_shape():
    m = ContinualMetrics(
        order=ORDER, matrix=MATRIX, before_training={"b": 0.4, "c": 0.3}, zero_shot={"b": 0.25, "c": 0.2}
    )
    d = m.as_dict()
    assert d["acc"] == pytest.approx(0.583333, abs=1e-6)
    assert d["bwt"] == pytest.approx(-0.175)
    assert d["fwt"] == pytest.approx(0.125)
    assert d["matrix"][1] == [0.8, 0.7, None]
    assert d["per_task"] == {"a": 0.6, "b": 0.65, "c": 0.5}


def test_accuracy_and_normalisation():
    assert accuracy(["x", "y", "z"], ["x", "y", "y"]) == pytest.approx(2 / 3)
    assert math.isnan(accuracy([], []))
    assert normalize_answer("  Sports. ") == "sports"
    assert normalize_answer("Sci/Tech") == "sci tech"


def test_stripping_rate_per_label_is_a_threshold_cut():
    from moecl.metrics import label_stripping_rate

    scores = [0.99, 0.95, 0.9, 0.8, 0.6, 0.4]
    positive = [True, True, True, False, True, False]
    # top-3 all correct (precision 1.0); top-4 0.75; top-5 0.8: at target 0.9 the best is 3 of 6
    assert label_stripping_rate(scores, positive, 0.9) == pytest.approx(0.5)
    assert label_stripping_rate(scores, positive, 0.75) == pytest.approx(5 / 6)
    assert label_stripping_rate([0.9], [False], 0.9) == 0.0
    # a tie at the threshold: the cut takes both tied items or neither (rank 2 alone would be 2/2 = 1.0)
    assert label_stripping_rate([0.9, 0.8, 0.8], [True, True, False], 0.9) == pytest.approx(1 / 3)


def test_stripping_rate_sums_both_labels():
    scores = [0.99, 0.95, 0.9, 0.8, 0.6, 0.4, 0.1, 0.05]
    positive = [True, True, True, False, True, False, False, False]
    # positive: the top 3 (3/8); negative (1 - score, ascending scores): 0.05, 0.1, 0.4 are all negative, the
    # next (0.6) is positive (3/4 = 0.75 < 0.9) and 0.8 makes 4/5 = 0.8: 3/8
    assert stripping_rate(scores, positive, 0.9) == pytest.approx(3 / 8 + 3 / 8)
    # one negative item: no positive cut is precise, the negative cut at P(negative) >= 0.1 is
    assert stripping_rate([0.9], [False], 0.9) == pytest.approx(0.0 + 1.0)
    # two tied, opposite items: neither cut can take one without the other
    assert stripping_rate([0.5, 0.5], [True, False], 0.9) == pytest.approx(0.0)


def test_continual_metrics_round_trip_through_their_json_shape():
    from moecl.metrics import ContinualMetrics

    m = ContinualMetrics(
        order=["a", "b", "c"],
        matrix=[{"a": 0.9}, {"a": 0.8, "b": 0.7}, {"a": 0.6, "b": 0.75, "c": 0.5}],
        before_training={"b": 0.3, "c": 0.2},
        zero_shot={"b": 0.25, "c": 0.1},
    )
    back = ContinualMetrics.from_dict(m.as_dict())
    assert back.as_dict() == m.as_dict()
    assert back.matrix == m.matrix and back.steps == m.steps


def test_correctness_marks_each_record():
    assert correctness(["a", "b", "c"], ["a", "x", "c"]) == "101"
    with pytest.raises(ValueError):
        correctness(["a"], ["a", "b"])


def test_paired_difference_hand_computed():
    # task x: a right on 3 of 4, b on 1 of 4, both right on record 0: d = [0, 1, 1, 0], mean .5,
    # sample var 1/3, var of the mean 1/12. Task y: identical answers, d = 0. ACC diff (.5 + 0) / 2 = .25,
    # s.e. sqrt(1/12 + 0) / 2.
    pair = paired_acc_difference({"x": "1110", "y": "0101"}, {"x": "1000", "y": "0101"})
    assert pair.diff == pytest.approx(0.25)
    assert pair.se == pytest.approx(math.sqrt(1 / 12) / 2)
    assert (pair.a_only, pair.b_only, pair.records) == (2, 0, 8)
    # the paired difference is exactly the difference of the two ACCs
    acc_a = (3 / 4 + 2 / 4) / 2
    acc_b = (1 / 4 + 2 / 4) / 2
    assert pair.diff == pytest.approx(acc_a - acc_b)
    # swapping the sides flips the sign, not the uncertainty
    swapped = paired_acc_difference({"x": "1000", "y": "0101"}, {"x": "1110", "y": "0101"})
    assert swapped.diff == pytest.approx(-0.25) and swapped.se == pytest.approx(pair.se)
    assert (swapped.a_only, swapped.b_only) == (0, 2)


def test_paired_difference_is_tighter_than_independent_accuracies():
    # two models that agree on 90 of 100 records: the paired s.e. is well under the unpaired one
    a = "1" * 50 + "0" * 40 + "1" * 10
    b = "1" * 50 + "0" * 40 + "0" * 10
    pair = paired_acc_difference({"t": a}, {"t": b})
    unpaired = math.sqrt(0.6 * 0.4 / 100 + 0.5 * 0.5 / 100)
    assert pair.diff == pytest.approx(0.1) and pair.se < unpaired / 2


def test_paired_difference_rejects_unmatched_samples():
    with pytest.raises(ValueError, match="same tasks"):
        paired_acc_difference({"x": "10"}, {"y": "10"})
    with pytest.raises(ValueError, match="task 'x'"):
        paired_acc_difference({"x": "10"}, {"x": "101"})


def test_mean_paired_difference_over_runs_hand_computed():
    from moecl.metrics import PairedDifference, mean_paired_difference

    # three pairs of runs: diffs .02, .04, .09 (mean .05), s.e. .03, .04, .00
    pairs = [PairedDifference(0.02, 0.03, 0, 0, 1), PairedDifference(0.04, 0.04, 0, 0, 1)]
    pairs.append(PairedDifference(0.09, 0.0, 0, 0, 1))
    m = mean_paired_difference(pairs)
    assert m["mean"] == pytest.approx(0.05) and m["n"] == 3
    # test sampling: independent errors add in quadrature, then the mean divides by k
    assert m["se_test"] == pytest.approx(math.sqrt(0.03**2 + 0.04**2) / 3, abs=1e-6)
    # the pairs' scatter: sample sd of (.02, .04, .09) = sqrt(((-.03)^2 + (-.01)^2 + .04^2) / 2), over sqrt(3)
    assert m["se_seeds"] == pytest.approx(math.sqrt((0.0009 + 0.0001 + 0.0016) / 2) / math.sqrt(3), abs=1e-6)
    one = mean_paired_difference(pairs[:1])
    assert (one["mean"], one["se_test"], one["se_seeds"]) == (0.02, 0.03, None)
    assert mean_paired_difference([])["mean"] is None


def test_pooled_paired_differences_sum_the_records_and_keep_each_pair():
    from moecl.metrics import PairedDifference, pooled_paired_differences

    pairs = [("order1/s42", PairedDifference(0.02, 0.03, 5, 3, 100))]
    pairs.append(("order1/s43", PairedDifference(0.04, 0.01, 6, 2, 100)))
    pooled = pooled_paired_differences(pairs)
    assert pooled["diff"]["mean"] == pytest.approx(0.03) and pooled["se"] == pytest.approx(0.02)
    assert (pooled["reference_only"], pooled["other_only"], pooled["records"]) == (11, 5, 200)
    assert pooled["orders"] == ["order1/s42", "order1/s43"]
    assert pooled["by_run"]["order1/s43"] == {"diff": 0.04, "se": 0.01}
    assert pooled["over_runs"]["n"] == 2 and pooled["over_runs"]["mean"] == pytest.approx(0.03)


def test_acc_standard_error_is_the_binomial_one():
    from moecl.metrics import acc_standard_error

    # one task at 50% over 24 records: sqrt(.25 / 24)
    assert acc_standard_error({"a": 0.5}, {"a": 24}) == pytest.approx(math.sqrt(0.25 / 24), abs=1e-6)
    # two tasks: their variances p(1-p)/n add, and ACC's mean over T = 2 tasks divides by T (not sqrt(T)):
    # sqrt(.25/100 + .09/400) / 2; a task at 0% or 100% adds no variance but still counts in T
    assert acc_standard_error({"a": 0.5, "b": 0.9}, {"a": 100, "b": 400}) == pytest.approx(
        math.sqrt(0.25 / 100 + 0.09 / 400) / 2, abs=1e-6
    )
    assert acc_standard_error({"a": 0.5, "b": 1.0}, {"a": 100, "b": 100}) == pytest.approx(0.025)
    assert acc_standard_error({"a": 0.5}, {}) is None  # sizes unknown: no figure rather than a wrong one
    assert acc_standard_error({"a": 0.5, "b": None}, {"a": 24}) == pytest.approx(0.102062, abs=1e-6)


def test_spread_is_mean_sample_std_and_range():
    from moecl.metrics import spread

    # 0.5, 0.6, 0.9: mean 2/3; sample variance ((1/6)^2 + (1/15)^2 + (7/30)^2) / 2 = 13/300 (n - 1, not n)
    assert spread([0.5, 0.6, None, 0.9]) == pytest.approx(
        {"mean": 2 / 3, "std": math.sqrt(13 / 300), "min": 0.5, "max": 0.9, "n": 3}, abs=1e-6
    )
    assert spread([0.25]) == {"mean": 0.25, "std": None, "min": 0.25, "max": 0.25, "n": 1}
    assert spread([None]) == {"mean": None, "std": None, "min": None, "max": None, "n": 0}


def test_paired_tables_pair_runs_of_the_same_seed_only() -> None:
    from moecl.metrics import paired_comparisons

    runs = [
        marked_run("moecl", "1100", 42),
        marked_run("moecl", "0000", 43),
        marked_run("seq_lora", "1000", 42),  # seq_lora has no seed-43 run: moecl's seed 43 stays unpaired
        marked_run("o_lora", "0000", 42),
        marked_run("o_lora", "1111", 43),
    ]
    table = paired_comparisons(runs, ["moecl"])["moecl"]["instruction"]
    assert table["seq_lora"]["records"] == 4 and table["seq_lora"]["diff"]["mean"] == 0.25
    assert table["o_lora"]["records"] == 8 and table["o_lora"]["diff"]["mean"] == (0.5 - 1.0) / 2
    # each pair of runs keeps its own figure: what a table of the seeds side by side reads
    assert {o: d["diff"] for o, d in table["o_lora"]["by_run"].items()} == {
        "order1/s42": 0.5,
        "order1/s43": -1.0,
    }
    assert list(table["seq_lora"]["by_run"]) == ["order1/s42"]


def test_the_instrument_check_pairs_mtl_with_seq_lora_seed_by_seed() -> None:
    from moecl.metrics import instrument_check

    runs = [
        marked_run("mtl", "1110", 42),
        marked_run("seq_lora", "1000", 42),
        marked_run("seq_lora", "0000", 43),
        marked_run("mtl", "1111", 43),
        marked_run("mtl", "1111", 44),  # seq_lora has no seed-44 run: left unpaired
    ]
    check = instrument_check(runs)["instruction"]
    assert check["diff"] == 0.5  # the first seed's pair
    assert check["over_runs"]["n"] == 2 and check["over_runs"]["mean"] == (0.5 + 1.0) / 2


def test_summarise_runs_spreads_each_rows_runs_and_keeps_the_rows_order() -> None:
    from moecl.metrics import summarise_runs

    def run(method, order, seed, acc):
        metrics = {"per_task": {"t": acc}}
        return {"method": method, "mode": "instruction", "order": order, "seed": seed, "metrics": metrics} | {
            "acc": acc,
            "bwt": -acc / 10,
            "fwt": None,
        }

    runs = [run("a", "order1", 42, 0.5), run("b", "order1", 42, 0.9), run("a", "order2", 43, 0.7)]
    summary = summarise_runs(runs, {"instruction": {"t": 100}}, rows=["b", "a"])["instruction"]
    assert list(summary) == ["b", "a"]
    a = summary["a"]
    assert a["acc"]["mean"] == pytest.approx(0.6) and a["acc"]["std"] == pytest.approx(
        math.sqrt(0.02), abs=1e-6
    )
    assert a["bwt"]["mean"] == pytest.approx(-0.06) and a["fwt"]["n"] == 0
    # ACC's test-sampling s.e. per run: sqrt(p (1 - p) / n) over one task, then the mean over the runs
    assert a["acc_se"] == pytest.approx((math.sqrt(0.25 / 100) + math.sqrt(0.21 / 100)) / 2, abs=1e-6)
    assert a["runs"] == ["order1/s42", "order2/s43"] and a["orders"] == ["order1", "order2"]
    assert summarise_runs(runs)["instruction"]["a"]["acc_se"] is None  # test sizes unknown: no figure


def test_a_joint_run_pairs_with_the_reference_on_every_order() -> None:
    from moecl.metrics import paired_comparisons

    runs = [
        marked_run("moecl", "1100", order="order1"),
        marked_run("moecl", "1110", order="order2"),
        marked_run("mtl", "1000"),
    ]
    table = paired_comparisons(runs, ["moecl"])["moecl"]["instruction"]["mtl"]
    assert table["by_run"] == {
        "order1/s42": {"diff": 0.25, "se": pytest.approx(0.25)},
        "order2/s42": {"diff": 0.5, "se": pytest.approx(0.2886751, abs=1e-6)},
    }


def test_the_joint_upper_bound_as_reference_pairs_with_every_orders_run_of_its_seed() -> None:
    from moecl.metrics import paired_comparisons

    runs = [
        marked_run("mtl", "1110", 42),
        marked_run("mtl", "1111", 43),
        marked_run("seq_lora", "1000", 42),
        marked_run("seq_lora", "1100", 42, "order2"),
        marked_run("seq_lora", "0000", 43),
        marked_run("seq_lora", "1111", 44),  # mtl has no seed-44 run: left unpaired
    ]
    table = paired_comparisons(runs, ["mtl"])["mtl"]["instruction"]["seq_lora"]
    # mtl - seq_lora, one pair per seq_lora run with mtl's run of its seed, named by the seq_lora run
    assert {where: d["diff"] for where, d in table["by_run"].items()} == {
        "order1/s42": 0.5,
        "order2/s42": 0.25,
        "order1/s43": 1.0,
    }
    assert table["records"] == 12 and table["over_runs"]["n"] == 3

"""The promotion gate: each check passes and fails on constructed inputs; decide() and its reasons."""

import json
import sys
from pathlib import Path

import pytest

from moecl.config import GateConfig
from moecl.drift import DataDriftResult
from moecl.gates import (
    Check,
    GateDecision,
    check_behaviour,
    check_data_drift,
    check_forgetting,
    confidence_ks,
    decide,
    ks_statistic,
)
from moecl.io import write_json_atomic
from moecl.metrics import ContinualMetrics

CFG = GateConfig(
    max_task_drop=0.05,
    min_bwt=-0.05,
    min_new_task_accuracy=0.5,
    min_canary_agreement=0.7,
    max_confidence_ks=0.5,
)


def by_name(checks):
    return {c.name: c for c in checks}


def challenger(matrix, order=("agnews", "yelp", "amazon")):
    return ContinualMetrics(order=list(order), matrix=[dict(r) for r in matrix])


# A three-step stream whose diagonal equals the champion's: no forgetting, BWT 0.
GOOD = challenger(
    [
        {"agnews": 0.81},
        {"agnews": 0.80, "yelp": 0.70},
        {"agnews": 0.80, "yelp": 0.70, "amazon": 0.90},
    ]
)
CHAMPION = {"agnews": 0.81, "yelp": 0.70}


# --- forgetting -------------------------------------------------------------------------------------------


def test_forgetting_passes_within_allowed_drop():
    checks = by_name(check_forgetting(GOOD, CHAMPION, "amazon", CFG))
    assert set(checks) == {"forgetting[agnews]", "forgetting[yelp]", "bwt", "new_task_accuracy"}
    assert all(c.passed for c in checks.values())
    assert checks["forgetting[agnews]"].value == pytest.approx(0.01)
    assert checks["forgetting[agnews]"].threshold == 0.05


def test_forgetting_drop_exactly_at_the_limit_passes():
    metrics = challenger([{"agnews": 0.80}, {"agnews": 0.76, "yelp": 0.9}], order=("agnews", "yelp"))
    checks = by_name(check_forgetting(metrics, {"agnews": 0.81}, "yelp", CFG))
    assert checks["forgetting[agnews]"].passed  # 0.81 - 0.76 == 0.05 up to float error


def test_forgetting_fails_on_a_task_drop_and_names_the_task():
    metrics = challenger(
        [{"agnews": 0.70}, {"agnews": 0.69, "yelp": 0.70}, {"agnews": 0.69, "yelp": 0.70, "amazon": 0.9}]
    )
    checks = by_name(check_forgetting(metrics, CHAMPION, "amazon", CFG))
    drop = checks["forgetting[agnews]"]
    assert not drop.passed
    assert drop.value == pytest.approx(0.12)
    assert (
        drop.reason
        == "forgetting: task 'agnews' dropped 0.12 below the champion (0.81 -> 0.69), allowed 0.05"
    )
    assert checks["forgetting[yelp]"].passed


def test_forgetting_fails_when_an_earlier_task_was_not_evaluated():
    metrics = challenger([{"agnews": 0.8}, {"agnews": 0.8, "amazon": 0.9}], order=("agnews", "amazon"))
    checks = by_name(check_forgetting(metrics, CHAMPION, "amazon", CFG))
    assert not checks["forgetting[yelp]"].passed
    assert "not evaluated" in checks["forgetting[yelp]"].detail


def test_forgetting_without_a_champion_checks_only_bwt_and_the_new_task():
    metrics = challenger([{"agnews": 0.8}], order=("agnews",))
    checks = check_forgetting(metrics, None, "agnews", CFG)
    assert [c.name for c in checks] == ["bwt", "new_task_accuracy"]
    assert all(c.passed for c in checks)


def test_a_new_version_of_a_known_task_is_not_compared_with_the_champion():
    # agnews v2 is scored on its new test data: a lower number is not forgetting.
    metrics = ContinualMetrics(
        order=["agnews", "yelp"],
        matrix=[{"agnews": 0.8}, {"agnews": 0.8, "yelp": 0.7}, {"agnews": 0.6, "yelp": 0.7}],
        steps=["agnews", "yelp", "agnews"],
    )
    names = [c.name for c in check_forgetting(metrics, {"agnews": 0.8, "yelp": 0.7}, "agnews", CFG)]
    assert "forgetting[agnews]" not in names and "forgetting[yelp]" in names


def test_bwt_pass_and_fail():
    ok = by_name(check_forgetting(GOOD, None, "amazon", CFG))["bwt"]
    assert ok.passed and ok.value == pytest.approx(-0.005)
    bad_metrics = challenger(
        [{"agnews": 0.9}, {"agnews": 0.8, "yelp": 0.9}, {"agnews": 0.7, "yelp": 0.8, "amazon": 0.9}]
    )
    bad = by_name(check_forgetting(bad_metrics, None, "amazon", CFG))["bwt"]
    assert not bad.passed
    assert bad.value == pytest.approx(-0.15)
    assert bad.reason == "bwt: BWT -0.150, required >= -0.050"


def test_new_task_accuracy_floor_pass_and_fail():
    ok = by_name(check_forgetting(GOOD, CHAMPION, "amazon", CFG))["new_task_accuracy"]
    assert ok.passed and ok.value == pytest.approx(0.9)
    weak = challenger([{"agnews": 0.8}, {"agnews": 0.8, "amazon": 0.3}], order=("agnews", "amazon"))
    bad = by_name(check_forgetting(weak, {"agnews": 0.8}, "amazon", CFG))["new_task_accuracy"]
    assert not bad.passed
    assert bad.reason == "new_task_accuracy: new task 'amazon' accuracy 0.30, required >= 0.50"
    missing = by_name(check_forgetting(GOOD, CHAMPION, "imdb", CFG))["new_task_accuracy"]
    assert not missing.passed and missing.value is None


# --- behaviour on canaries --------------------------------------------------------------------------------


def canaries(labels_a, labels_b, conf_a=0.9, conf_b=0.9):
    champ = [(task, label, conf_a) for task, label in labels_a]
    chall = [(task, label, conf_b) for task, label in labels_b]
    return champ, chall


def test_canary_agreement_passes_when_predictions_match():
    items = [("agnews", "sports")] * 10 + [("yelp", "pos")] * 10
    checks = by_name(check_behaviour(*canaries(items, items), CFG))
    assert set(checks) == {
        "canary_agreement",
        "canary_agreement[agnews]",
        "canary_agreement[yelp]",
        "confidence_ks",
    }
    assert all(c.passed for c in checks.values())
    assert checks["canary_agreement"].value == 1.0


def test_canary_agreement_fails_overall():
    champ = [("agnews", "sports")] * 10
    chall = [("agnews", "sports")] * 5 + [("agnews", "world")] * 5
    checks = by_name(check_behaviour(*canaries(champ, chall), CFG))
    assert not checks["canary_agreement"].passed
    assert checks["canary_agreement"].reason == (
        "canary_agreement: overall: challenger agrees with the champion on 5/10 canaries (0.50), required >= 0.70"
    )


def test_canary_agreement_fails_for_one_task_while_overall_passes():
    champ = [("agnews", "sports")] * 16 + [("yelp", "pos")] * 4
    chall = [("agnews", "sports")] * 16 + [("yelp", "neg")] * 4
    checks = by_name(check_behaviour(*canaries(champ, chall), CFG))
    assert checks["canary_agreement"].passed  # 16/20 = 0.8
    assert checks["canary_agreement[agnews]"].passed
    failed = checks["canary_agreement[yelp]"]
    assert not failed.passed and failed.value == 0.0
    assert "task 'yelp'" in failed.reason and failed.reason.startswith("canary_agreement: ")


def test_confidence_ks_passes_on_similar_and_fails_on_shifted_confidences():
    items = [("agnews", "sports")] * 20
    champ = [("agnews", "sports", 0.80 + 0.005 * i) for i in range(20)]
    similar = [("agnews", "sports", 0.81 + 0.005 * i) for i in range(20)]
    shifted = [("agnews", "sports", 0.30 + 0.005 * i) for i in range(20)]
    assert by_name(check_behaviour(champ, similar, CFG))["confidence_ks"].passed
    bad = by_name(check_behaviour(champ, shifted, CFG))["confidence_ks"]
    assert not bad.passed and bad.value == pytest.approx(1.0)
    assert bad.reason.startswith("confidence_ks: confidence distribution shift KS=1.00")
    assert "allowed <= 0.50" in bad.reason
    # max_confidence_ks = 1.0 switches the check off
    off = GateConfig(max_confidence_ks=1.0)
    assert by_name(check_behaviour(champ, shifted, off))["confidence_ks"].passed
    assert items  # same labels: agreement is unaffected by the shift
    assert by_name(check_behaviour(champ, shifted, CFG))["canary_agreement"].passed


def test_own_ks_statistic_matches_scipy_and_is_used_without_scipy(monkeypatch):
    a = [0.1, 0.4, 0.4, 0.7, 0.9, 0.95]
    b = [0.2, 0.4, 0.5, 0.5, 0.6]
    stat, p = confidence_ks(a, b)
    assert p is not None
    assert ks_statistic(a, b) == pytest.approx(stat)
    assert ks_statistic(a, a) == 0.0
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # makes `from scipy.stats import ...` fail
    stat_own, p_own = confidence_ks(a, b)
    assert p_own is None and stat_own == pytest.approx(stat)


def test_no_canaries_is_an_informational_pass():
    checks = check_behaviour([], [], CFG)
    assert len(checks) == 1 and checks[0].passed and checks[0].value is None


@pytest.mark.parametrize(
    "champ, chall, message",
    [
        ([("a", "x", 0.5)], [], "1 champion canary predictions vs 0"),
        ([("a", "x", 0.5)], [("b", "x", 0.5)], "task 'a' for the champion vs 'b'"),
        ([("a", "x", 0.5)], [("a", "x", 1.5)], "outside [0, 1]"),
    ],
)
def test_behaviour_rejects_misaligned_inputs(champ, chall, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_behaviour(champ, chall, CFG)


# --- data drift -------------------------------------------------------------------------------------------


def drift_result(drifted: bool, has_reference: bool = True) -> DataDriftResult:
    columns = {
        "label": {"drifted": drifted, "score": 0.001 if drifted else 0.4, "method": "Z-test p_value"},
        "text_length": {"drifted": drifted, "score": 0.0 if drifted else 0.3, "method": "K-S p_value"},
        "oov_share": {"drifted": False, "score": 0.2, "method": "K-S p_value"},
    }
    share = 2 / 3 if drifted else 0.0
    return DataDriftResult(
        task_id="agnews",
        drifted=drifted,
        drift_share=share if has_reference else 0.0,
        columns=columns if has_reference else {},
        report_path="reports/agnews.html",
        max_drift_share=0.5,
        has_reference=has_reference,
        note="" if has_reference else "new task: no previous version to compare with",
    )


def test_data_drift_on_a_known_task_fails_the_gate():
    (check,) = check_data_drift(drift_result(drifted=True), CFG)
    assert not check.passed
    assert check.value == pytest.approx(2 / 3) and check.threshold == 0.5
    assert check.reason.startswith(
        "data_drift: task 'agnews': 2 of 3 columns drifted (share 0.67, allowed 0.50)"
    )
    assert "label (Z-test p_value 0.001)" in check.reason


def test_no_data_drift_on_a_known_task_passes():
    (check,) = check_data_drift(drift_result(drifted=False), CFG)
    assert check.passed and check.value == 0.0


def test_data_drift_is_reported_but_not_gated_when_switched_off():
    (check,) = check_data_drift(drift_result(drifted=True), GateConfig(gate_on_data_drift=False))
    assert check.passed and "not gated" in check.detail


def test_a_new_task_is_never_gated_on_drift():
    (check,) = check_data_drift(drift_result(drifted=False, has_reference=False), CFG)
    assert check.passed and "new task" in check.detail and "not gated" in check.detail
    (none_check,) = check_data_drift(None, CFG)
    assert none_check.passed


# --- decision ---------------------------------------------------------------------------------------------


def test_decide_promotes_when_everything_passes():
    checks = check_forgetting(GOOD, CHAMPION, "amazon", CFG) + check_data_drift(drift_result(False), CFG)
    decision = decide(checks)
    assert decision.decision == "promote" and decision.promoted
    assert decision.reasons == [f"all {len(checks)} checks passed"]


def test_decide_rejects_and_lists_every_failure():
    bad = challenger(
        [{"agnews": 0.70}, {"agnews": 0.69, "yelp": 0.70}, {"agnews": 0.69, "yelp": 0.70, "amazon": 0.3}]
    )
    checks = check_forgetting(bad, CHAMPION, "amazon", CFG) + check_data_drift(drift_result(True), CFG)
    decision = decide(checks)
    assert decision.decision == "reject" and not decision.promoted
    assert decision.reasons[0] == (
        "forgetting: task 'agnews' dropped 0.12 below the champion (0.81 -> 0.69), allowed 0.05"
    )
    assert [r.split(":")[0] for r in decision.reasons] == ["forgetting", "new_task_accuracy", "data_drift"]


def test_decide_with_no_checks_rejects():
    decision = decide([])
    assert decision.decision == "reject" and "no checks" in decision.reasons[0]


def test_gate_json_shape_round_trips(tmp_path: Path):
    checks = [
        Check("bwt", False, -0.1234567891, -0.05, "BWT -0.123"),
        Check("x", True, float("nan"), None, ""),
    ]
    decision = decide(checks)
    path = write_json_atomic(tmp_path / "metrics" / "gate.json", decision.to_dict())
    data = json.loads(path.read_text())
    assert set(data) == {"decision", "reasons", "checks"}
    assert data["decision"] == "reject" and data["reasons"] == ["bwt: BWT -0.123"]
    assert data["checks"][0] == {
        "name": "bwt",
        "passed": False,
        "value": -0.123457,
        "threshold": -0.05,
        "detail": "BWT -0.123",
    }
    assert data["checks"][1]["value"] is None  # NaN is not JSON
    again = GateDecision.from_dict(data)
    assert again.decision == "reject" and [c.name for c in again.checks] == ["bwt", "x"]

"""Integrity, each checked by corrupting bytes on purpose (docs/operations.md, "The champion is corrupted"):

1. a bank is verified on load: a flipped byte in an expert file, the shared file or bank.json, a truncated or
   a missing file is refused with an IntegrityError naming the file, the expected and the found hash; every
   single-bit flip of bank.json is refused or leaves what the loader reads unchanged;
2. `predict`, `eval`, `step`, the DVC pipeline's first stage, promotion and rollback refuse a corrupted bank;
3. the self-evolution path does not train from a corrupted champion: it records the version as failed for the
   reason "integrity", leaves the champion as it is, and after a rollback the next run processes the version
   once;
4. `moecl registry verify [--all]` lists every problem, one line each naming its file, and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from moecl.bank import file_sha256, load_bank, read_manifest, save_bank
from moecl.cli import main
from moecl.errors import BankError, IntegrityError
from moecl.integrity import CHECKSUM_KEY, FORMAT, parse_manifest
from moecl.model.base import BaseSpec
from moecl.registry import Registry
from moecl.testing import (
    NO_MODEL,
    TOPICS,
    assert_consistent,
    decisions,
    land,
    make_task,
    no_training,
    run_library,
    tree,
    workspace_params,
    write_params,
)

HASH = re.compile(r"[0-9a-f]{64}")


def flip(path: Path, offset: int, bit: int = 0x01) -> None:
    """Flip one bit of the byte at `offset` (negative: from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= bit
    path.write_bytes(bytes(data))


def _no_model():
    raise AssertionError("the base model was loaded")


# --- a bank with two tasks (expert-topics, expert-sentiment, shared) ----------------------------------------------
@pytest.fixture(scope="module")
def clean_bank(tmp_path_factory, tiny_base):
    from moecl.config import Params
    from moecl.train.step import run_step

    params = Params()
    params.train.epochs, params.train.lr, params.train.batch_size, params.train.max_length = 1, 5e-3, 8, 48
    params.train.evals_per_epoch, params.evaluate.max_new_tokens, params.evaluate.fwt = 1, 3, False
    root = tmp_path_factory.mktemp("banks")
    topics, sentiment = make_task("topics", TOPICS), make_task("sentiment", ["positive", "negative"])
    run_step(params, topics, base=tiny_base, out_bank=root / "b1", progress=False)
    run_step(params, sentiment, base=tiny_base, parent_bank=root / "b1", out_bank=root / "b2", progress=False)
    return root / "b2"


@pytest.fixture
def bank(clean_bank, tmp_path) -> Path:
    copy = tmp_path / "bank"
    shutil.copytree(clean_bank, copy)  # copies: the module's bank is never touched
    return copy


def test_a_new_bank_is_sealed_and_loads(bank, tiny_base):
    manifest = read_manifest(bank)
    assert manifest.format == FORMAT and HASH.fullmatch(manifest.manifest_sha256)
    assert [t.file for t in manifest.tasks] == [
        "expert-topics.safetensors",
        "expert-sentiment.safetensors",
    ]
    assert all(file_sha256(bank / t.file) == t.sha256 for t in manifest.tasks)
    assert load_bank(bank, tiny_base).manifest == manifest


@pytest.mark.parametrize(
    "name", ["expert-topics.safetensors", "expert-sentiment.safetensors", "shared.safetensors"]
)
@pytest.mark.parametrize("where", ["header", "middle", "last"])
def test_a_flipped_byte_in_a_tensor_file_is_refused_naming_the_file_and_both_hashes(bank, name, where):
    path = bank / name
    expected = file_sha256(path)
    flip(path, {"header": 12, "middle": path.stat().st_size // 2, "last": -1}[where])
    found = file_sha256(path)
    loader = BaseSpec("tiny-llama", read_manifest(bank).base_model.sha256, _no_model)
    with pytest.raises(IntegrityError) as caught:
        load_bank(bank, loader)  # refused before the base model is even loaded
    message = str(caught.value)
    assert str(path) in message and f"expected {expected}, found {found}" in message


def test_a_truncated_or_missing_file_is_refused(bank, tiny_base):
    path = bank / "expert-topics.safetensors"
    expected = file_sha256(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        IntegrityError, match=rf"{re.escape(str(path))}: sha256 mismatch: expected {expected}"
    ):
        load_bank(bank, tiny_base)
    path.unlink()
    with pytest.raises(IntegrityError, match=rf"{re.escape(str(path))}: missing \(bank.json records sha256"):
        load_bank(bank, tiny_base)


def test_every_single_bit_flip_of_bank_json_is_refused_or_harmless(bank):
    """Each bit 0 of each byte flipped in turn: the manifest is refused, or it reads exactly as before (a flip
    that JSON ignores). Never a different manifest: another label, lr, hash or file name."""
    path = bank / "bank.json"
    original, manifest = path.read_bytes(), parse_manifest(bank)
    refused = harmless = 0
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        try:
            read = parse_manifest(bank)
        except IntegrityError as exc:
            assert str(path) in str(exc)
            refused += 1
            continue
        assert read == manifest, f"a flip at byte {offset} changed what the loader reads"
        harmless += 1
    assert refused > 0.9 * len(original), (refused, harmless)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ('"sports"', '"sportr"'),  # a label: a different model head, silently
        ('"lr": 0.005', '"lr": 0.004'),  # a value of the lineage
        (f'"format": "{FORMAT}"', '"format": "moecl-bank/1"'),  # a sealed manifest passed off as a legacy one
    ],
)
def test_a_changed_value_in_bank_json_is_refused_with_both_checksums(bank, tiny_base, before, after):
    path = bank / "bank.json"
    text = path.read_text()
    assert before in text
    path.write_text(text.replace(before, after, 1))
    with pytest.raises(IntegrityError, match=re.escape(str(path))) as caught:
        load_bank(bank, tiny_base)
    expected = json.loads(text)[CHECKSUM_KEY]
    assert "moecl-bank/1" in after or f"expected sha256 {expected}, found " in str(caught.value)


def test_a_legacy_manifest_without_checksum_still_loads_and_its_files_are_checked(bank, tiny_base):
    sealed = read_manifest(bank)
    manifest = json.loads((bank / "bank.json").read_text())
    manifest.pop(CHECKSUM_KEY)
    manifest["format"] = "moecl-bank/1"
    (bank / "bank.json").write_text(json.dumps(manifest))
    legacy = load_bank(bank, tiny_base).manifest  # read as the same typed manifest, less its checksum
    assert legacy == dataclasses.replace(sealed, format="moecl-bank/1", manifest_sha256=None)
    flip(bank / "shared.safetensors", -1)
    with pytest.raises(IntegrityError, match="shared.safetensors: sha256 mismatch"):
        load_bank(bank, tiny_base)


def test_a_legacy_manifest_whose_section_does_not_fit_its_type_is_refused_naming_the_file(bank):
    manifest = json.loads((bank / "bank.json").read_text())
    manifest.pop(CHECKSUM_KEY)
    manifest.update(format="moecl-bank/1", lora={"rank": 8})  # no checksum protects a legacy manifest
    (bank / "bank.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=re.escape(f"{bank / 'bank.json'}: the manifest does not fit")):
        read_manifest(bank)


def test_a_step_refuses_to_carry_a_corrupted_parent_file_into_a_new_bank(bank, tiny_base, tmp_path):
    loaded = load_bank(bank, tiny_base)
    flip(
        bank / "expert-topics.safetensors", -1
    )  # corrupted after it was loaded, before the new bank reuses it
    out = tmp_path / "child"
    with pytest.raises(IntegrityError, match="expert-topics.safetensors: sha256 mismatch"):
        save_bank(
            loaded.model,
            out,
            base=tiny_base,
            trained_task="sentiment",
            parent_dir=bank,
            steps=["topics", "sentiment"],
            history={},
            lineage={},
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no bank, no temporary folder


def test_evaluation_refuses_a_corrupted_bank_even_where_its_evaluation_is_stored(bank, tiny_base):
    from moecl.config import Params
    from moecl.evaluate import evaluate_bank

    params = Params()
    params.evaluate.fwt, params.train.max_length = False, 48
    tasks = {
        "topics": make_task("topics", TOPICS),
        "sentiment": make_task("sentiment", ["positive", "negative"]),
    }
    evaluate_bank(bank, tiny_base, tasks, params, progress=False)
    assert (bank / "evaluation.json").is_file()
    flip(bank / "expert-sentiment.safetensors", -1)
    with pytest.raises(IntegrityError, match="expert-sentiment.safetensors: sha256 mismatch"):
        evaluate_bank(bank, tiny_base, tasks, params, progress=False)


def test_a_missing_manifest_is_no_bank_not_a_corrupted_one(tmp_path):
    with pytest.raises(BankError, match="no bank manifest here") as caught:
        parse_manifest(tmp_path)
    assert not isinstance(caught.value, IntegrityError)


# --- a workspace: champion v0002 (topics, sentiment), previous champion v0001 (topics) ---------------------------------
@pytest.fixture(scope="module")
def two_champions_ws(tmp_path_factory, tiny_base):
    import os

    root = tmp_path_factory.mktemp("two-champions") / "ws"
    root.mkdir()
    params = workspace_params()
    write_params(root, params)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        land(root, make_task("topics", TOPICS))
        assert [o.decision for o in run_library(params, tiny_base)] == ["promote"]
        land(root, make_task("sentiment", ["positive", "negative"]))
        assert [o.decision for o in run_library(params, tiny_base)] == ["promote"]
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def ws(two_champions_ws, copy_workspace):
    return copy_workspace(two_champions_ws)


def _bank_of(root: Path, version: str) -> Path:
    registry = Registry(root / "registry", root)
    return registry.bank_path(registry.get(version))


def test_the_workspace_verifies_clean(ws, capsys):
    assert main(["registry", "verify", "--all"]) == 0
    out = capsys.readouterr().out
    assert "ok (2 version(s), a champion; every bank hashed" in out
    registry = Registry(ws / "registry", ws)
    assert registry.champion().version == "v0002"
    assert json.loads((ws / "registry" / "champion.json").read_text())["previous"] == ["v0001"]


def test_predict_eval_and_step_refuse_a_corrupted_champion(ws, capsys):
    champion = _bank_of(ws, "v0002")
    path = champion / "expert-topics.safetensors"
    expected = file_sha256(path)
    flip(path, path.stat().st_size // 2)
    found = file_sha256(path)
    params = workspace_params()
    params.model.name_or_path = str(
        ws / "no-such-model"
    )  # resolving it would fail: the bank's check comes first
    write_params(ws, params)
    for argv in (
        ["predict", "--task", "topics", "some text"],
        ["eval"],
        ["eval", "--bank", str(champion)],
        ["step", "--task", "sentiment", "--bank", str(champion)],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{path}: sha256 mismatch: expected {expected}, found {found}" in err, (argv, err)


def test_the_dvc_pipeline_stops_at_its_first_stage_on_a_corrupted_champion(ws, capsys):
    from moecl.stages import main as stage

    flip(_bank_of(ws, "v0002") / "shared.safetensors", -1)
    assert stage(["champion"]) == 2
    assert "shared.safetensors: sha256 mismatch" in capsys.readouterr().err
    assert not (ws / "pipeline" / "champion.json").exists()


def test_promote_and_rollback_refuse_a_corrupted_bank_and_change_nothing(ws, capsys):
    flip(_bank_of(ws, "v0001") / "bank.json", -3)  # the rollback target's manifest
    before = tree(ws / "registry")
    assert main(["rollback", "--reason", "test"]) == 2
    assert "cannot roll back to v0001" in capsys.readouterr().err
    with pytest.raises(IntegrityError, match="cannot promote v0001"):
        Registry(ws / "registry", ws).promote("v0001")
    assert tree(ws / "registry") == before


def _sentiment2():
    return make_task("sentiment", ["positive", "negative"], seed=7)  # a new version of a known task


def test_evolution_does_not_train_from_a_corrupted_champion_and_the_version_waits_for_a_rollback(
    ws, tiny_base, monkeypatch, capsys
):
    from moecl import evolve
    from moecl.data.validate import task_folder_hash

    params = workspace_params()
    version = task_folder_hash(land(ws, _sentiment2(), replace=True))
    champion_bank = _bank_of(ws, "v0002")
    flip(champion_bank / "expert-sentiment.safetensors", 100)
    champion_before = (ws / "registry" / "champion.json").read_bytes()
    before = tree(ws)
    with monkeypatch.context() as patch, pytest.raises(IntegrityError) as caught:
        patch.setattr("moecl.train.launch.launch_step", no_training)
        run_library(params, NO_MODEL)  # no model is loaded, nothing is trained
    assert "expert-sentiment.safetensors: sha256 mismatch" in str(caught.value)
    assert "Roll back to the last verified bank" in str(caught.value)
    after = tree(ws)
    assert (ws / "registry" / "champion.json").read_bytes() == champion_before
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed == {"registry/events.jsonl"}  # the failure, and nothing else
    registry = Registry.from_params(params)
    (failure,) = registry.failures("sentiment", version)
    assert failure["reason"] == "integrity" and "expert-sentiment.safetensors" in failure["detail"]
    assert registry.processed("sentiment", version) is None  # still pending
    assert [p.data_version for p in evolve.pending_versions(params, registry)] == [version]
    assert main(["registry", "verify"]) == 1
    assert "expert-sentiment.safetensors: sha256 mismatch" in capsys.readouterr().out

    # recovery (docs/operations.md): roll back to the last verified bank; the next run processes the version once
    assert main(["rollback", "--reason", "v0002's bank is corrupted"]) == 0
    assert Registry.from_params(params).champion().version == "v0001"
    (outcome,) = run_library(params, tiny_base)
    assert (outcome.task_id, outcome.data_version, outcome.champion_before) == ("sentiment", version, "v0001")
    assert outcome.decision in ("promote", "reject") and outcome.version == "v0003"
    assert decisions(registry, "v0003") == [
        "registered",
        "promoted" if outcome.decision == "promote" else "rejected",
    ]
    assert _bank_of(ws, "v0003").name.endswith("-from-v0001")
    assert run_library(params, tiny_base) == []
    assert_consistent(ws)


# --- moecl registry verify -------------------------------------------------------------------------------------------
def _corrupt(ws: Path, kind: str) -> str:
    """Damage the registry one way; returns what the problem's line must contain (its file, and more)."""
    reg = ws / "registry"
    if kind == "champion-expert":
        path = _bank_of(ws, "v0002") / "expert-topics.safetensors"
        flip(path, -1)
        return f"{path}: sha256 mismatch"
    if kind == "old-bank-manifest":
        path = _bank_of(ws, "v0001") / "bank.json"
        flip(path, path.read_text().index('"sports"') + 2)
        return f"{path}: manifest checksum mismatch"
    if kind == "old-bank-missing":
        bank = _bank_of(ws, "v0001")
        shutil.rmtree(bank)
        return f"{bank}: the bank folder is missing (v0001)"
    if kind == "champion-pointer":
        (reg / "champion.json").write_text('{"version": "v00')
        return f"{reg / 'champion.json'}: not valid JSON"
    if kind == "champion-unknown":
        (reg / "champion.json").write_text('{"version": "v0009", "previous": ["v0001"]}')
        return f"{reg / 'champion.json'}: names v0009, which has no record"
    if kind == "record":
        (reg / "versions" / "v0001.json").write_text("{")
        return f"{reg / 'versions' / 'v0001.json'}: not valid JSON"
    if kind == "torn-event":
        lines = (reg / "events.jsonl").read_text().splitlines()
        lines.insert(1, '{"event": "promoted", "vers')
        (reg / "events.jsonl").write_text("\n".join(lines) + "\n")
        return f"{reg / 'events.jsonl'}:2: not valid JSON"
    if kind == "decision-without-bank":
        with open(reg / "events.jsonl", "a") as fh:
            fh.write(json.dumps({"event": "rejected", "version": "v0007"}) + "\n")
        n = len((reg / "events.jsonl").read_text().splitlines())
        return f"{reg / 'events.jsonl'}:{n}: rejected v0007, which has no record"
    raise ValueError(kind)


KINDS = [
    "champion-expert",
    "old-bank-manifest",
    "old-bank-missing",
    "champion-pointer",
    "champion-unknown",
    "record",
    "torn-event",
    "decision-without-bank",
]


@pytest.mark.parametrize("kind", KINDS)
def test_registry_verify_names_each_problem_on_its_own_line(ws, kind, capsys):
    expected = _corrupt(ws, kind)
    assert main(["registry", "verify"]) == 1
    captured = capsys.readouterr()
    assert any(line.startswith(expected) for line in captured.out.splitlines()), captured.out
    assert re.search(r"^\d+ problem\(s\) in ", captured.err, re.M)


def test_registry_verify_lists_every_problem_at_once_and_all_hashes_every_bank(ws, capsys):
    path = _bank_of(ws, "v0001") / "shared.safetensors"
    flip(path, -1)
    assert main(["registry", "verify"]) == 0  # by default only the champion's bank is hashed
    capsys.readouterr()
    assert main(["registry", "verify", "--all"]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{path}: sha256 mismatch: expected " + _rest(path)]

    expected = [_corrupt(ws, k) for k in ("champion-expert", "record", "torn-event", "decision-without-bank")]
    assert main(["registry", "verify", "--all"]) == 1
    lines = capsys.readouterr().out.splitlines()
    for text in expected:
        assert sum(line.startswith(text) for line in lines) == 1, (text, lines)
    assert all(line.startswith(str(ws)) for line in lines)  # every line names its file


def _rest(path: Path) -> str:
    """The rest of the line `registry verify` prints for a corrupted shared file of v0001."""
    expected, found = read_manifest(path.parent).shared.sha256, file_sha256(path)
    return (
        f"{expected}, found {found} ({path.stat().st_size} bytes; the file is corrupted or truncated) (v0001)"
    )

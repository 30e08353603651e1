"""The README's "Your own task, by hand" block, run as written.

The block is read from README.md between its markers (so the README cannot drift from the code) and run by
bash, from a folder laid out like a clone after `make demo`: `.venv` (this test run's environment) and `demo/`,
set up by the demo's own `setup_workspace`, on a tiny model, with a champion already in place. The shell's
PATH does not hold the environment's tools: the block's `source .venv/bin/activate` must bring them.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BEGIN, END = "<!-- readme-by-hand:begin -->", "<!-- readme-by-hand:end -->"


def by_hand_script(text: str) -> str:
    """The bash blocks between the README's markers, joined in order."""
    if BEGIN not in text or END not in text:
        raise AssertionError(f"README.md: the markers {BEGIN} and {END} are missing")
    section = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    blocks = re.findall(r"^```bash\n(.*?)^```$", section, re.S | re.M)
    if not blocks:
        raise AssertionError("README.md: no ```bash block between the by-hand markers")
    return "\n".join(blocks)


def test_the_by_hand_block_covers_the_path_and_is_valid_bash():
    script = by_hand_script(README.read_text(encoding="utf-8"))
    commands = [
        "source .venv/bin/activate",
        "moecl data import",
        "moecl data validate",
        "dvc add data",
        "git commit",
        "dvc repro",
        "python -m moecl.stages promote",
        "moecl predict",
        "moecl eval",
        "moecl step",
    ]
    positions = [script.find(c) for c in commands]
    assert all(p >= 0 for p in positions), [c for c, p in zip(commands, positions) if p < 0]
    assert positions == sorted(positions)  # activation first, then the path in order
    subprocess.run(["bash", "-n", "-c", script], check=True)


def _shell_env_without(venv_bin: Path) -> dict:
    """This process's environment with the virtual environment off PATH, as in a fresh shell."""
    keep = [
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and Path(p).resolve() != venv_bin.resolve()
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(keep)
    return env


@pytest.mark.slow
def test_the_readme_by_hand_section_runs_as_written(tmp_path, tiny_tok, two_tasks, monkeypatch):
    from moecl import demo
    from moecl.bank import read_manifest
    from moecl.config import load_params
    from moecl.data.demo_stream import Landing
    from moecl.evolve import process_version, version_for
    from moecl.model.base import base_from_params
    from moecl.registry import Registry
    from moecl.testing import tiny_llama

    venv = Path(sys.prefix)
    if sys.prefix == sys.base_prefix or not (venv / "bin" / "activate").is_file():
        pytest.skip("the tests do not run in a virtual environment: nothing for `source .venv/bin/activate`")
    env = _shell_env_without(venv / "bin")
    assert shutil.which("moecl", path=env["PATH"]) is None  # only the block's activation can find it

    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / ".venv").symlink_to(venv, target_is_directory=True)
    model_dir = tmp_path / "tiny-model"
    tiny_llama(len(tiny_tok)).save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)

    # `make demo`: the workspace, then a first task landed (dvc add + git commit) and promoted
    workspace = clone / "demo"
    monkeypatch.setattr(demo, "WORKSPACE", workspace)
    demo.setup_workspace()
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["model"]["name_or_path"] = str(model_dir)
    params["train"].update({"epochs": 2, "lr": 0.005, "max_length": 64, "evals_per_epoch": 1})
    # the tiny model is noisy: gates loose enough that the new task is promoted, as the README expects
    params["gate"].update(
        {"max_task_drop": 1.0, "min_bwt": -1.0, "min_canary_agreement": 0.0, "max_confidence_ks": 1.0}
    )
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    topics = two_tasks[0]
    demo.land(
        Landing(
            topics.task_id,
            "v1",
            "synthetic topics",
            lambda: (topics.labels, topics.train, topics.test),
            topics.instruction,
        )
    )
    monkeypatch.chdir(workspace)
    p = load_params("params.yaml")
    outcome = process_version(
        p, version_for(p, "topics"), base=base_from_params(p.model), registry=Registry.from_params(p)
    )
    assert outcome.decision == "promote" and outcome.version == "v0001"

    script = by_hand_script(README.read_text(encoding="utf-8"))
    run = subprocess.run(
        ["bash", "-e", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=1800
    )
    assert run.returncode == 0, (
        f"README block failed ({run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    )

    registry = Registry(workspace / "registry", workspace)
    champion = registry.champion()
    assert champion.version == "v0002" and champion.task_id == "tickets"
    champion_bank = registry.bank_path(champion)
    log = subprocess.run(["git", "log", "--format=%s"], cwd=workspace, capture_output=True, text=True)
    assert log.stdout.splitlines()[0] == "data: tickets v1"

    predictions = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"text"')]
    assert [x["label"] in ("billing", "bug") for x in predictions] == [True, True]
    assert f"predict: the champion v0002 ({champion_bank})" in run.stderr
    assert f"eval: the champion v0002 ({champion_bank})" in run.stderr
    header = next(line for line in run.stdout.splitlines() if line.startswith("after step"))
    assert header.split()[2:] == ["topics", "tickets"]  # the accuracy matrix of both tasks

    # step 6: from the champion (no earlier `moecl step` here), with the -S given after the command
    assert f"step: continuing from the champion v0002 ({champion_bank})" in run.stderr
    last = json.loads((workspace / "banks" / "last-step.json").read_text())
    assert last["task"] == "tickets" and (workspace / last["parent"]).resolve() == champion_bank.resolve()
    assert read_manifest(workspace / last["bank"]).lineage.params["train"]["epochs"] == 1

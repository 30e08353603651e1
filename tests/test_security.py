"""Security, each checked by injecting the fault (docs/operations.md says what happens on call): loading is
safetensors + JSON only, no remote code by default, the local server listens on 127.0.0.1, and no record
text reaches logs, artifacts, metrics, plots, reports, banks or the registry records.

Every workspace here uses relative paths (data/tasks, banks, registry, metrics, ...) and the test runs in it, so
"nothing else was written" is a comparison of the whole folder (moecl.testing.tree). Runs use one torch thread: on
two shared cores more threads only wait for each other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from moecl.config import Params, load_params
from moecl.data.validate import task_folder_hash
from moecl.registry import Registry
from moecl.testing import MARK, artifacts_and_logs, flow_runs_named, land, make_task, tree, workspace_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the fixtures champion_ws, ws: tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """A pickle that creates a folder when unpickled: proof of whether anything unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _pickle_bomb(marker: Path) -> bytes:
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload is live ...
    assert marker.is_dir()
    marker.rmdir()  # ... and disarmed until something unpickles it again
    return payload


def test_no_pickle_based_loading_in_the_code():
    """AST scan of moecl/ and flows/: no pickle-family imports, no torch.load, no unsafe yaml, no np.load with
    pickles, and every model from_pretrained asks for safetensors (or reads a GGUF file)."""
    import ast

    banned_modules = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    banned_calls = {
        "torch.load",
        "torch.jit.load",
        "yaml.load",
        "yaml.unsafe_load",
        "yaml.full_load",
        "pickle.load",
    }
    problems = []

    def dotted(node) -> str:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(node.id)
        return ".".join(reversed(parts))

    files = sorted((ROOT / "moecl").rglob("*.py")) + sorted((ROOT / "flows").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [
                    f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in banned_modules
                ]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                problems.append(f"{where}: from {node.module} import")
            elif isinstance(node, ast.Call):
                name = dotted(node.func)
                keywords = {k.arg: k.value for k in node.keywords}
                if name in banned_calls:
                    problems.append(f"{where}: {name}()")
                if name.endswith("load") and "allow_pickle" in keywords:
                    problems.append(f"{where}: {name}(allow_pickle=...)")
                if name.endswith("Model.from_pretrained") or name.endswith("ForCausalLM.from_pretrained"):
                    safe = keywords.get("use_safetensors")
                    if (
                        not (isinstance(safe, ast.Constant) and safe.value is True)
                        and "gguf_file" not in keywords
                    ):
                        problems.append(f"{where}: {name}() without use_safetensors=True")
    assert problems == []


def test_a_bank_loads_from_safetensors_and_json_only(champion_ws, tiny_base, tmp_path):
    """Stray pickles in a bank folder are never read; a manifest pointing at a pickle is refused, not run."""
    import torch

    from moecl.bank import load_bank

    registry = Registry(champion_ws / "registry", champion_ws)
    original = registry.bank_path(registry.champion())
    bank = tmp_path / "bank"
    shutil.copytree(original, bank)
    marker = tmp_path / "unpickled"
    bomb = _pickle_bomb(marker)
    for name in ("shared.pt", "expert-topics.bin", "pytorch_model.bin", "bank.pkl", "training_args.bin"):
        (bank / name).write_bytes(bomb)
    loaded, reference = load_bank(bank, tiny_base), load_bank(original, tiny_base)
    assert not marker.exists()
    a, b = loaded.model.state_dict(), reference.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from moecl.bank import file_sha256
    from moecl.integrity import seal

    manifest = json.loads((bank / "bank.json").read_text())
    manifest["tasks"][0]["file"] = "expert-topics.bin"  # a manifest sealed again after pointing at a pickle
    manifest["tasks"][0]["sha256"] = file_sha256(bank / "expert-topics.bin")
    (bank / "bank.json").write_text(json.dumps(seal(manifest)))
    with pytest.raises(Exception, match=r"(?i)header|safetensor|deserializ"):
        load_bank(bank, tiny_base)
    assert not marker.exists()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tok):
    from moecl.testing import tiny_llama

    folder = tmp_path / "tiny-model"
    tiny_llama(len(tiny_tok)).save_pretrained(folder)
    tiny_tok.save_pretrained(folder)
    return folder


def test_backbone_loads_safetensors_without_remote_code_unless_params_say_so(tiny_model_dir, monkeypatch):
    import transformers

    from moecl.config import ModelConfig
    from moecl.model.base import base_from_params

    assert Params().model.trust_remote_code is False
    assert load_params(str(ROOT / "params.yaml")).model.trust_remote_code is False
    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, _cls=cls.__name__, **kwargs):
            calls.append((_cls, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    base_from_params(ModelConfig(name_or_path=str(tiny_model_dir))).load()
    assert [c for c, _ in calls] == ["AutoModelForCausalLM", "AutoTokenizer"]
    assert all(kw["trust_remote_code"] is False for _, kw in calls)
    assert calls[0][1]["use_safetensors"] is True
    calls.clear()
    base_from_params(ModelConfig(name_or_path=str(tiny_model_dir), trust_remote_code=True)).load()
    assert all(kw["trust_remote_code"] is True for _, kw in calls)


def test_a_backbone_with_pickled_weights_only_is_refused_unread(tiny_model_dir, tmp_path):
    from moecl.backbone import BackboneError, load_backbone, pull_backbone
    from moecl.config import ModelConfig

    for weights in tiny_model_dir.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "unpickled"
    (tiny_model_dir / "pytorch_model.bin").write_bytes(_pickle_bomb(marker))
    with pytest.raises(BackboneError, match="safetensors"):
        pull_backbone(ModelConfig(name_or_path=str(tiny_model_dir)))
    with pytest.raises(BackboneError):
        load_backbone(tiny_model_dir)
    assert not marker.exists()


def test_local_prefect_server_listens_on_localhost_only(tmp_path, monkeypatch):
    from flows import server
    from moecl.cli import build_parser

    assert server.DEFAULT_HOST == "127.0.0.1" and server.api_url().startswith("http://127.0.0.1:")
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    started = []

    class FakeServer:
        pid, returncode = 4242, None

        def __init__(self, argv, **kwargs):
            started.append(argv)

        def poll(self):
            return None

    answers = iter([False, True])  # "nothing answers yet" before the start, healthy after it
    monkeypatch.setattr(server.subprocess, "Popen", FakeServer)
    monkeypatch.setattr(server, "healthy", lambda url, timeout=2.0: next(answers))
    running = server.start_server(log_path=tmp_path / "server.log")
    (argv,) = started
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "0.0.0.0" not in argv
    assert running.url == "http://127.0.0.1:4200/api"


def _with_marker(task, tag: str):
    return dataclasses.replace(
        task,
        train=[dataclasses.replace(r, text=f"{MARK}-{tag}-train {r.text}") for r in task.train],
        test=[dataclasses.replace(r, text=f"{MARK}-{tag}-test {r.text}") for r in task.test],
    )


@pytest.mark.slow
def test_no_record_text_reaches_logs_artifacts_metrics_plots_reports_or_registry(
    flow_server, ws, tiny_base, capfd, caplog
):
    """A task whose every text carries MARK goes the whole way through the flow and is promoted. MARK then
    appears only in data/ and in registry/snapshots/ (the drift reference: a copy of the data)."""
    import logging

    from flows.self_evolve import injected_base, self_evolve
    from moecl.bank import read_manifest

    caplog.set_level(logging.DEBUG)
    folder = land(ws, _with_marker(make_task("secret", ["spam", "ham"]), "flow"))
    version = task_folder_hash(folder)
    with injected_base(tiny_base):
        state = self_evolve(return_state=True)
    assert state.is_completed(), state.message
    assert [(r["task_id"], r["decision"]) for r in state.result()] == [("secret", "promote")]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        (sub,) = flow_runs_named(client, [f"secret@{version[:10]}"])
    artifacts, logs = artifacts_and_logs([state.state_details.flow_run_id, sub.id])
    assert any(a.startswith("moecl-summary") for a in artifacts) and logs
    out, err = capfd.readouterr()
    leaks = [f"artifact {a[:40]!r}" for a in artifacts if MARK in a]
    leaks += [f"log line {line[:80]!r}" for line in logs if MARK in line]
    leaks += [
        name for name, text in (("stdout", out), ("stderr", err), ("caplog", caplog.text)) if MARK in text
    ]
    for path, data in tree(ws).items():
        if MARK.encode() in data and not path.startswith(("data/", "registry/snapshots/")):
            leaks.append(path)
    assert leaks == []
    assert MARK.encode() in (ws / "registry" / "snapshots" / "secret" / "train.jsonl").read_bytes()
    bank = Registry.from_params(load_params("params.yaml")).champion_bank()
    assert read_manifest(bank).method.memory_per_task == 0
    from safetensors import safe_open

    with safe_open(str(bank / "expert-secret.safetensors"), "pt") as f:
        assert "memory.input_ids" not in f.keys()  # noqa: SIM118


def test_discriminator_memory_keeps_token_ids_of_texts_only_when_enabled(tiny_base, tiny_tok, tmp_path):
    """method.memory_per_task > 0 stores N training inputs per task as token ids in the task's expert file: not
    the text's bytes, but decodable back to it (docs/operations.md: keep it at 0 where that matters)."""
    from safetensors import safe_open

    from moecl.train.step import run_step

    params = workspace_params()
    params.method.memory_per_task, params.train.max_length = 2, 128  # classifier inputs keep the text's start
    task = _with_marker(make_task("secret", ["spam", "ham"], n_train=8, n_test=4), "memory")
    run_step(params, task, base=tiny_base, out_bank=tmp_path / "bank", progress=False)
    expert = tmp_path / "bank" / "expert-secret.safetensors"
    assert MARK.encode() not in expert.read_bytes()
    with safe_open(str(expert), "pt") as f:
        rows = f.get_tensor("memory.input_ids").tolist()
    assert len(rows) == 2
    assert all(MARK in tiny_tok.decode([i for i in row if i >= 0]) for row in rows)

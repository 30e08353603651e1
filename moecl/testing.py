"""Tiny, in-process models and tasks for tests and the smoke benchmark (no hub, no downloads), and the plain
helpers (no pytest) that more than one test module uses: task folders, models that know tasks, bank stubs, and
the fault-injection workspaces of the reliability tests (tests/test_bad_data.py, test_crash.py,
test_concurrency.py, test_security.py, test_disk_full.py, test_integrity.py, test_prefect_outage.py)."""

from __future__ import annotations

import datetime
import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from moecl.data.task import Record, TaskData
from moecl.model.base import BaseSpec

if TYPE_CHECKING:
    from moecl.config import Params
    from moecl.model.moecl_model import MoECLModel
    from moecl.registry import Registry

_WORDS = {
    "sports": "match goal team coach score league player season win cup striker",
    "business": "market shares profit bank stock company merger revenue trade price",
    "science": "research atom cell planet theory experiment lab physics data gene",
    "politics": "election vote senate policy minister law party debate campaign",
    "positive": "great lovely excellent happy wonderful superb enjoyed perfect",
    "negative": "awful terrible bad broken poor refund angry disappointed worst",
    "spam": "winner prize free money click offer viagra lottery urgent cash",
    "ham": "meeting tomorrow lunch project notes thanks family schedule report",
}


def make_task(
    task_id: str,
    labels: list[str],
    n_train: int = 24,
    n_test: int = 12,
    seed: int = 0,
    instruction: str = "",
    positive_label: str | None = None,
) -> TaskData:
    """A synthetic, learnable task: each label has its own vocabulary, mixed with shared filler words."""
    rng = random.Random(f"{task_id}-{seed}")
    filler = "the a of and to in is it for on with as".split()

    def records(n: int, split: str) -> list[Record]:
        out = []
        for i in range(n):
            label = labels[i % len(labels)]
            vocab = _WORDS.get(label, label).split()
            words = [rng.choice(vocab) for _ in range(4)] + [rng.choice(filler) for _ in range(4)]
            rng.shuffle(words)
            out.append(Record(f"{split}{i} " + " ".join(words), label))
        return out

    return TaskData(
        task_id=task_id,
        labels=list(labels),
        train=records(n_train, "tr"),
        test=records(n_test, "te"),
        instruction=instruction or f"Which label fits this {task_id} text?",
        positive_label=positive_label,
    )


def tiny_tokenizer(extra_texts: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(v.split()) for v in _WORDS.values()] + list(extra_texts or [])
    corpus += ["Classify the text into one of the options.", "Options: Text: Answer:", "0123456789 , . : \n"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.padding_side = "left"
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def tiny_base(tokenizer=None, seed: int = 0, name: str = "tiny-llama") -> BaseSpec:
    """A BaseSpec over `tiny_llama(seed)` with `tokenizer` (default `tiny_tokenizer()`): every load() builds a
    fresh, identical copy, and the sha256 is that model's fingerprint."""
    from moecl.model.base import state_dict_fingerprint

    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    sha = state_dict_fingerprint(tiny_llama(len(tok), seed=seed))
    return BaseSpec(name, sha, lambda: (tiny_llama(len(tok), seed=seed), tok))


def write_task_folder(root, task):
    import yaml

    folder = root / task.task_id
    folder.mkdir(parents=True)
    (folder / "task.yaml").write_text(
        yaml.safe_dump({"labels": task.labels, "instruction": task.instruction, "description": "synthetic"})
    )
    for split in ("train", "test"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for r in getattr(task, split):
                f.write(json.dumps({"text": r.text, "label": r.label}) + "\n")
    return folder


def model_with_tasks(base_model, lora, method, tasks, b_std: float = 0.0) -> MoECLModel:
    """A MoECLModel that knows `tasks` (TaskInfo); with b_std, every LoRA B drawn from N(0, b_std), so that
    no delta is zero and every LoRA parameter gets a gradient."""
    import torch

    from moecl.model.moecl_model import MoECLModel

    model = MoECLModel(base_model, lora, method)
    for info in tasks:
        model.add_task(info)
    if b_std:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".B"):
                    p.normal_(0, b_std)
    return model


def stub_bank(root: Path, name: str) -> Path:
    """A bank folder with a whole (sealed) manifest and no tensor files: enough for the registry."""
    from moecl.integrity import seal

    bank = root / "banks" / name
    bank.mkdir(parents=True)
    manifest = {"base_model": {"name": "none", "sha256": "0" * 64}, "method": {}, "lora": {}}
    manifest.update(tasks=[], shared=None, steps=[], lineage={})
    (bank / "bank.json").write_text(json.dumps(seal(manifest)))
    return bank


FAR_CRON = f"0 0 1 {(datetime.date.today().month + 5) % 12 + 1} *"  # ~6 months away: past Prefect's 100-day
# scheduling horizon, so the poll deployment gets no pre-created Scheduled run during a test


# --- the reliability tests' workspaces ---------------------------------------------------------------------------
# Every workspace uses relative paths (data/tasks, banks, registry, metrics, ...) and the test runs in it, so
# "nothing else was written" is a comparison of the whole folder (`tree`). The workspace fixtures (champion_ws,
# ws) and one_torch_thread are in tests/conftest.py.
TOPICS = ["sports", "business", "science"]
MARK = "zqx-secret-marker-7731"  # put into record texts that must never be echoed anywhere
# the tqdm line of a step once it has taken at least one optimisation step
TRAINING = re.compile(r"train (\S+):\s+\d+%\|[^|\n\r]*\|\s*([1-9]\d*)/\d+")


def workspace_params() -> Params:
    """Tiny, fast, relative paths; gates relaxed (the tiny model is noisy: these tests gate on what they inject)."""
    from moecl.config import Params

    p = Params()
    p.data.root, p.registry.root, p.registry.banks_dir = "data/tasks", "registry", "banks"
    p.train.epochs, p.train.lr, p.train.batch_size, p.train.max_length = 1, 5e-3, 8, 48
    p.train.evals_per_epoch, p.train.threads = 1, 1
    p.evaluate.max_new_tokens, p.evaluate.fwt = 3, False
    p.gate.max_task_drop, p.gate.min_bwt = 1.0, -1.0
    p.gate.min_canary_agreement, p.gate.max_confidence_ks, p.gate.canary_per_task = 0.0, 1.0, 4
    return p


def write_params(root: Path, params: Params) -> None:
    import yaml

    (root / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))


def tree(root: Path) -> dict[str, bytes]:
    """Every file and folder under root (folders as b'<dir>'): equal trees = nothing written."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(root.rglob("*"))
    }


def land(root: Path, task, *, replace: bool = False) -> Path:
    folder = root / "data" / "tasks" / task.task_id
    if replace and folder.exists():
        shutil.rmtree(folder)
    return write_task_folder(root / "data" / "tasks", task)


def sentiment_task(seed: int = 0) -> TaskData:
    return make_task("sentiment", ["positive", "negative"], seed=seed)


def run_library(params: Params, base) -> list:
    from moecl.evolve import Outputs, evolve_pending
    from moecl.registry import Registry

    return evolve_pending(
        params, base=base, registry=Registry.from_params(params), outputs=Outputs(Path(".")), progress=False
    )


def decisions(registry: Registry, version: str) -> list[str]:
    return [e["event"] for e in registry.history_events(version)]


def assert_consistent(root: Path) -> None:
    """What a reader may see after any crash: whole banks, whole registry files, a champion that exists, whole
    metrics and plots. A temporary file or folder of an interrupted write is hidden (its name starts with '.')."""
    from moecl.registry import Registry

    for entry in (root / "banks").iterdir():
        if entry.name.startswith("."):
            continue
        manifest = json.loads((entry / "bank.json").read_text())
        assert all((entry / t["file"]).is_file() for t in manifest["tasks"]), entry
    registry = Registry(root / "registry", root)
    for record in registry.list_versions():
        assert registry.bank_path(record).is_dir(), record.version
    for line in (root / "registry" / "events.jsonl").read_text().splitlines():
        json.loads(line)
    champion = json.loads((root / "registry" / "champion.json").read_text())
    for version in [champion["version"], *champion["previous"]]:
        assert registry.bank_path(registry.get(version)).is_dir()
    for path in (root / "metrics").glob("*.json"):
        json.loads(path.read_text())
    for path in (root / "plots").glob("*.png"):
        assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), f"torn PNG {path}"
    for folder in ("metrics", "plots", "reports", "registry"):
        for path in (root / folder).rglob("*"):
            assert path.name.startswith(".") or ".tmp" not in path.name, f"visible temporary file {path}"


def no_training(*args, **kwargs):
    """Patched over moecl.train.launch.launch_step where a test proves that no training starts."""
    raise AssertionError("training started")


def _no_model():
    raise AssertionError("the base model was loaded")


NO_MODEL = BaseSpec("no-model", "0" * 64, _no_model)  # a version refused by validation never loads a model


# --- processes (tests/faults.py starts them) ------------------------------------------------------------------------
def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(predicate, timeout: float, what: str, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    tails = "\n".join(f"--- {p.name}\n{read_log(p)[-3000:]}" for p in logs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def join_process(proc, log: Path, timeout: float = 240) -> None:
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join(10)
        raise AssertionError(f"{proc.name} did not finish in {timeout:.0f} s\n{read_log(log)[-3000:]}")


# --- Prefect flow runs (under a test harness or a local server) --------------------------------------------------
def flow_runs_named(client, names: list[str]) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))


def artifacts_and_logs(run_ids: list) -> tuple[list[str], list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # the flow's logs reach the API in batches
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids))
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)))
    return [f"{a.key}\n{a.description}\n{a.data}" for a in artifacts], [log.message for log in logs]


def paper_method(**changes):
    """MethodConfig with every beyond-the-paper knob at the paper's value (MoE-CL as published), then `changes`:
    for tests about the paper's structure (one gate per layer, experts starting at zero)."""
    import dataclasses

    from moecl.config import MethodConfig

    return dataclasses.replace(MethodConfig().paper_setting(), paper=False, **changes)

"""The expert bank on disk: the model artifact.

    <bank>/bank.json                   manifest: base model + hash, method, LoRA settings, tasks (labels, mode,
                                       content hash of their data), step history, lineage (parent, params,
                                       code revision); read typed, as moecl.manifest.BankManifest
    <bank>/shared.safetensors          the shared expert, the gates and the discriminators (every step changes it)
    <bank>/expert-<task>.safetensors   one task's dedicated expert, head and discriminator memory
    <bank>/evaluation.json             written once by evaluation (the accuracy matrix up to this bank, and which
                                       test records it got right: moecl.metrics.correctness)

A bank directory is immutable: it appears whole (written under a temporary name, every file fsynced, then
renamed) and is never rewritten. The files of tasks a step did not train are hard links to (or copies of) the
parent's files, so they stay byte-identical. Loading reads safetensors and JSON only, never pickle, and checks
every file against the sha256 bank.json records and bank.json against its own checksum first
(moecl.integrity): a corrupted bank is refused with an IntegrityError naming the file, never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moecl.config import LoraSettings, MethodConfig
from moecl.errors import BankError, IntegrityError
from moecl.integrity import (
    EVALUATION,
    FORMAT,
    MANIFEST,
    SHARED_FILE,
    file_sha256,
    read_manifest,
    seal,
    verify_bank,
)
from moecl.io import environment, fsync_dir, git_revision, temp_folder_beside, write_error
from moecl.manifest import CONTENT_HASH_KEY, BankManifest
from moecl.model.base import BaseSpec
from moecl.model.moecl_model import MoECLModel, TaskInfo


def task_file(task_id: str) -> str:
    return f"expert-{task_id}.safetensors"


@dataclass
class LoadedBank:
    model: MoECLModel
    tokenizer: object
    manifest: BankManifest
    memory: dict[str, list[list[int]]]


def read_evaluation(bank_dir: str | Path) -> dict | None:
    path = Path(bank_dir) / EVALUATION
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def new_model(base: BaseSpec, lora: LoraSettings, method: MethodConfig) -> tuple[MoECLModel, object]:
    base_model, tokenizer = base.load()
    return MoECLModel(base_model, lora, method), tokenizer


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise BankError(f"{path}: missing bank file")
    return load_file(str(path))


def _assign(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor], where: Path) -> None:
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise BankError(f"{where}: missing tensors {missing[:3]}{'...' if len(missing) > 3 else ''}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise BankError(
                    f"{where}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(tensors[name].to(p.dtype))


def check_base(bank_dir: str | Path, manifest: BankManifest, base: BaseSpec) -> None:
    recorded = manifest.base_model
    if recorded.sha256 != base.sha256:
        raise BankError(
            f"{bank_dir}: this bank was built on base model {recorded.name!r} (sha256 {recorded.sha256[:12]}), "
            f"not on {base.name!r} (sha256 {base.sha256[:12]}); load it with its own base model"
        )


def load_bank(bank_dir: str | Path, base: BaseSpec, device=None) -> LoadedBank:
    """Rebuild the model of a bank on a fresh copy of its base model (which must be the same base).

    On the CPU unless `device` is given (a step adds its new expert first, then moves the model). Every file
    is checked against bank.json's sha256 first: a corrupted bank raises IntegrityError before the base loads."""
    bank_dir = Path(bank_dir)
    manifest = verify_bank(bank_dir)
    check_base(bank_dir, manifest, base)
    # copies: the model owns its settings, the manifest stays as read
    lora, method = dataclasses.replace(manifest.lora), dataclasses.replace(manifest.method)
    model, tokenizer = new_model(base, lora, method)
    memory: dict[str, list[list[int]]] = {}
    for entry in manifest.tasks:
        model.add_task(TaskInfo(entry.task_id, list(entry.labels), entry.instruction, entry.positive_label))
        path = bank_dir / entry.file
        tensors = _load_tensors(path)
        _assign(model.task_parameters(entry.task_id), tensors, path)
        if "memory.input_ids" in tensors:
            memory[entry.task_id] = [
                [i for i in row if i >= 0] for row in tensors["memory.input_ids"].tolist()
            ]
    shared = model.shared_parameters()
    if shared:
        path = bank_dir / SHARED_FILE
        _assign(shared, _load_tensors(path), path)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return LoadedBank(model, tokenizer, manifest, memory)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write a safetensors file (fsynced); returns the sha256 of the bytes meant to be on disk."""
    from safetensors.torch import save

    data = save(
        {k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}, metadata={"format": "pt"}
    )
    _write_durably(path, data)
    return hashlib.sha256(data).hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _reuse(src: Path, dst: Path, expected: str) -> str:
    """Take over a parent's file unchanged, refusing one that no longer has the hash its bank recorded."""
    _link_or_copy(src, dst)
    found = file_sha256(dst)
    if found != expected:
        raise IntegrityError(
            f"{src}: sha256 mismatch: expected {expected}, found {found}; the parent bank is corrupted"
        )
    return found


def save_bank(
    loaded_model: MoECLModel,
    out_dir: str | Path,
    *,
    base: BaseSpec,
    trained_task: str,
    parent_dir: str | Path | None,
    steps: list[str],
    history: dict,
    lineage: dict,
    memory: dict[str, list[list[int]]] | None = None,
    train_summary: dict | None = None,
) -> Path:
    """Write a new bank directory atomically. Tasks other than `trained_task` reuse the parent's files.

    `lineage` goes into the manifest's lineage; its "data_hash" (TaskData.content_hash() of the trained data,
    the key bank.json has always used) is also recorded on the trained task's entry.
    An OSError (a full disk) raises a WriteError naming the bank and the file; nothing of the bank remains."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise BankError(f"{out_dir}: already exists; banks are immutable, choose a new directory")
    parent_files = {t.task_id: t for t in read_manifest(parent_dir).tasks} if parent_dir else {}
    tmp = writing = None
    try:
        tmp = writing = temp_folder_beside(out_dir)
        tasks = []
        for info in loaded_model.tasks:
            name = task_file(info.task_id)
            writing = tmp / name
            reuse = info.task_id != trained_task and info.task_id in parent_files
            if reuse:
                parent_entry = parent_files[info.task_id]
                sha = _reuse(Path(parent_dir) / parent_entry.file, tmp / name, parent_entry.sha256)
            else:
                tensors = dict(loaded_model.task_parameters(info.task_id))
                rows = (memory or {}).get(info.task_id)
                if rows:
                    width = max(len(r) for r in rows)
                    tensors["memory.input_ids"] = torch.tensor([r + [-1] * (width - len(r)) for r in rows])
                if not tensors:  # e.g. seq_lora in instruction mode: nothing task-specific to store
                    tensors = {"empty": torch.zeros(0)}
                sha = _save_tensors(tensors, tmp / name)
            entry = {
                "task_id": info.task_id,
                "labels": info.labels,
                "instruction": info.instruction,
                "positive_label": info.positive_label,
                "mode": loaded_model.mode,
                "file": name,
                "sha256": sha,
            }
            # the content hash of the data the expert was trained on, under bank.json's key for it
            if reuse:
                entry[CONTENT_HASH_KEY] = parent_files[info.task_id].content_hash
            else:
                entry[CONTENT_HASH_KEY] = lineage.get(CONTENT_HASH_KEY)
            tasks.append(entry)
        shared_entry = None
        shared = loaded_model.shared_parameters()
        if shared:
            writing = tmp / SHARED_FILE
            shared_entry = {"file": SHARED_FILE, "sha256": _save_tensors(dict(shared), tmp / SHARED_FILE)}
        manifest = {
            "format": FORMAT,
            "base_model": {"name": base.name, "sha256": base.sha256},
            "method": dataclasses.asdict(loaded_model.method),
            "lora": dataclasses.asdict(loaded_model.lora),
            "mode": loaded_model.mode,
            "tasks": tasks,
            "shared": shared_entry,
            "steps": list(steps),
            "history": history,
            "lineage": {
                "parent": str(parent_dir) if parent_dir else None,
                "trained_task": trained_task,
                "code_revision": git_revision(),
                "environment": environment(),
                **lineage,
            },
            "train": train_summary or {},
        }
        writing = tmp / MANIFEST
        text = json.dumps(seal(json.loads(json.dumps(manifest))), indent=2, sort_keys=True)
        _write_durably(tmp / MANIFEST, text.encode("utf-8"))
        fsync_dir(tmp)
        writing = out_dir
        os.rename(tmp, out_dir)  # not io.install_folder: a bank never replaces another
    except BaseException as exc:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, OSError):
            raise
        where = f"writing {writing}" if writing else f"making a folder in {out_dir.parent}"
        removed = f": the temporary folder {tmp} was removed" if tmp else ""
        raise write_error(out_dir, exc, "the bank", f"It failed {where}; nothing was kept{removed}.") from exc
    fsync_dir(out_dir.parent)
    return out_dir

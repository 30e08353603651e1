"""The benchmark's tasks: the 4-task CL benchmark read in place from ../shared/data/mtl5, or synthetic tasks.

Train is sampled per class with the preset's seed (the training step carves its dev split from it); test is a
stratified sample of the preset's size. The data is never copied into the project.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.params import SYNTHETIC_TASKS
from moecl.data import importers
from moecl.data.task import TaskData
from moecl.sampling import sample_per_class
from moecl.testing import make_task

_REPO = Path(__file__).resolve().parent.parent
DEFAULT_MTL5 = (_REPO.parent / "shared" / "data" / "mtl5", _REPO / "shared" / "data" / "mtl5")


class DataMissing(RuntimeError):
    """The benchmark data is not where the bench looks for it (the message says where it looked)."""


def find_mtl5(explicit: str | Path | None = None) -> Path:
    """The folder named by `explicit` (only it), else $MOECL_MTL5, else ../shared/data/mtl5 or shared/data/mtl5."""
    env = os.environ.get("MOECL_MTL5")
    candidates = [Path(explicit)] if explicit else [Path(env)] if env else list(DEFAULT_MTL5)
    for path in candidates:
        if (path / "agnews" / "train.json").is_file():
            return path
    looked = ", ".join(map(str, candidates))
    hint = "set MOECL_MTL5 or --data to a folder holding <task>/{train,test,labels}.json"
    raise DataMissing(f"the mtl5 benchmark data is absent (looked in {looked}); {hint}")


def load_mtl5(root: Path, names: list[str], per_class: int, test_per_task: int, seed: int, split="test"):
    """task -> TaskData; with split "dev" the test records are training records not sampled for training."""
    tasks = {}
    for name in names:
        folder = root / name
        if not folder.is_dir():
            raise DataMissing(f"{folder}: task {name!r} is absent from the benchmark data")
        train, test, labels = importers.read_benchmark(folder)
        sampled = sample_per_class(train, labels, per_class, 0, seed, "bench-train")
        if split == "dev":
            taken = {(r.text, r.label) for r in sampled}
            test = [r for r in train if (r.text, r.label) not in taken]
        evaluated = sample_per_class(test, labels, 0, test_per_task, seed, f"bench-{split}")
        instruction = importers.benchmark_instruction(folder) or importers.BENCHMARK_INSTRUCTION["TC"]
        tasks[name] = TaskData(name, labels, sampled, evaluated, instruction=instruction, path=folder)
    return tasks


def synthetic_tasks(labels_by_task: dict, per_class: int, test_per_task: int, seed: int, split: str = "test"):
    """moecl.testing's synthetic tasks; split "dev" scores on other records of the same generator."""
    out = {}
    for task_id, labels in labels_by_task.items():
        out[task_id] = make_task(task_id, labels, per_class * len(labels), test_per_task, seed)
        if split == "dev":
            out[task_id].test = make_task(task_id, labels, 0, test_per_task, seed + 7919).test
    return out


def load_tasks(preset: dict, modes: list[str], orders: dict, data: str | None, split: str = "test") -> dict:
    """mode -> task_id -> TaskData (sizes differ by mode)."""
    names = sorted({t for order in orders.values() for t in order})
    out = {}
    for mode in modes:
        size = (preset["modes"][mode]["per_class"], preset["modes"][mode]["test_per_task"], preset["seed"])
        if preset["data"] == "synthetic":
            out[mode] = synthetic_tasks({n: SYNTHETIC_TASKS[n] for n in names}, *size, split)
        else:
            out[mode] = load_mtl5(find_mtl5(data), names, *size, split)
    return out


def data_summary(tasks: dict[str, TaskData]) -> dict[str, dict]:
    sizes = ("labels", "train", "test")
    return {
        t.task_id: {k: len(getattr(t, k)) for k in sizes} | {"instruction": t.instruction}
        for t in tasks.values()
    }

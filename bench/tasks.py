"""The benchmark's tasks: the 4-task CL benchmark read from ../shared/data/mtl5, or synthetic tasks.

Train is sampled per class with the preset's seed (the dev split is carved from it later, by the training
step, with train.dev_fraction); test is a stratified sample of the preset's size. The data is read in place,
never copied into the project.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moecl.data.importers import read_benchmark, stratified_sample
from moecl.data.task import TaskData
from moecl.testing import make_task

# Where the benchmark data lives, first hit wins: $MOECL_MTL5, then the shared folder beside the checkout.
_REPO = Path(__file__).resolve().parent.parent
DEFAULT_MTL5 = (_REPO.parent / "shared" / "data" / "mtl5", _REPO / "shared" / "data" / "mtl5")
# O-LoRA's instruction family of each task (mtl5/instruction_config.json): topic or sentiment.
TASK_FAMILY = {"agnews": "TC", "dbpedia": "TC", "yahoo": "TC", "amazon": "SC", "yelp": "SC"}
_FALLBACK_INSTRUCTION = {
    "TC": "What is the topic of the following paragraph? Choose one from the option.",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.",
}


class DataMissing(RuntimeError):
    """The benchmark data is not where the bench looks for it (the message says where it looked)."""


def find_mtl5(explicit: str | Path | None = None) -> Path:
    """The folder named by `explicit` (only it), else $MOECL_MTL5, else ../shared/data/mtl5 or shared/data/mtl5."""
    if explicit:
        candidates = [Path(explicit)]
    elif os.environ.get("MOECL_MTL5"):
        candidates = [Path(os.environ["MOECL_MTL5"])]
    else:
        candidates = list(DEFAULT_MTL5)
    for path in candidates:
        if (path / "agnews" / "train.json").is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise DataMissing(
        f"the mtl5 benchmark data is absent (looked in {looked}); set MOECL_MTL5 or --data to "
        "a folder holding <task>/{train,test,labels}.json"
    )


def _instructions(root: Path) -> dict[str, str]:
    path = root / "instruction_config.json"
    found = dict(_FALLBACK_INSTRUCTION)
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        for family, entries in config.items():
            if entries and entries[0].get("instruction"):
                found[family] = entries[0]["instruction"].strip()
    return found


def load_mtl5(
    root: Path, names: list[str], per_class: int, test_per_task: int, seed: int, split: str = "test"
) -> dict[str, TaskData]:
    """Each named task with `per_class` training records per class and `test_per_task` test records; with
    split "dev", the "test" records are drawn from the training file, among the records not sampled for
    training (settings are chosen there, and reported on test)."""
    instructions = _instructions(root)
    tasks = {}
    for name in names:
        folder = root / name
        if not folder.is_dir():
            raise DataMissing(f"{folder}: task {name!r} is absent from the benchmark data")
        train, test, labels = read_benchmark(folder)
        sampled = stratified_sample(train, labels, per_class, 0, seed, "bench-train")
        if split == "dev":
            taken = {(r.text, r.label) for r in sampled}
            rest = [r for r in train if (r.text, r.label) not in taken]
            evaluated = stratified_sample(rest, labels, 0, test_per_task, seed, "bench-dev")
        else:
            evaluated = stratified_sample(test, labels, 0, test_per_task, seed, "bench-test")
        tasks[name] = TaskData(
            task_id=name,
            labels=labels,
            train=sampled,
            test=evaluated,
            instruction=instructions[TASK_FAMILY.get(name, "TC")],
            path=folder,
        )
    return tasks


def synthetic_tasks(
    labels_by_task: dict[str, list[str]], per_class: int, test_per_task: int, seed: int, split: str = "test"
) -> dict[str, TaskData]:
    """moecl.testing's synthetic tasks; split "dev" scores on other records of the same generator."""
    shift = 7919 if split == "dev" else 0
    out = {}
    for task_id, labels in labels_by_task.items():
        task = make_task(task_id, labels, n_train=per_class * len(labels), n_test=test_per_task, seed=seed)
        if shift:
            task.test = make_task(task_id, labels, n_train=0, n_test=test_per_task, seed=seed + shift).test
        out[task_id] = task
    return out


def data_summary(tasks: dict[str, TaskData]) -> dict[str, dict]:
    return {
        t.task_id: {
            "labels": len(t.labels),
            "train": len(t.train),
            "test": len(t.test),
            "instruction": t.instruction,
        }
        for t in tasks.values()
    }

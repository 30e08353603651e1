"""Seeded, stratified sampling and splitting of task records (deterministic for a given seed)."""

from __future__ import annotations

import random
from collections import defaultdict

from moecl.data.task import Record


def by_label(records: list[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.label].append(r)
    return groups


def stratified_sample(records: list[Record], n: int, seed: int) -> list[Record]:
    """At most n records, label shares kept (round-robin over labels), order shuffled by the seed."""
    if n <= 0 or n >= len(records):
        return list(records)
    rng = random.Random(seed)
    groups = {label: rng.sample(recs, len(recs)) for label, recs in sorted(by_label(records).items())}
    picked: list[Record] = []
    while len(picked) < n:
        for label in list(groups):
            if groups[label] and len(picked) < n:
                picked.append(groups[label].pop())
    rng.shuffle(picked)
    return picked


def split_dev(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Carve a stratified dev split (at least one record per label with >= 2 records) from train."""
    if fraction <= 0:
        return list(records), []
    rng = random.Random(seed)
    train, dev = [], []
    for _, recs in sorted(by_label(records).items()):
        recs = rng.sample(recs, len(recs))
        k = int(round(len(recs) * fraction))
        k = min(max(k, 1), len(recs) - 1) if len(recs) >= 2 else 0
        dev.extend(recs[:k])
        train.extend(recs[k:])
    rng.shuffle(train)
    return train, dev

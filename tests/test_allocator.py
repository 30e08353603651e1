"""moecl.train.allocator: freed memory stays in the process for the next step, and can be handed back on demand."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from moecl.train import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")

# 300 blocks of 1 MiB, all alive at once, then freed: how many MiB the process's resident size drops by
_PROBE = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from moecl.train.allocator import keep_freed_memory, release_freed_memory

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    blocks = [torch.ones(256 * 1024) for _ in range(300)]
    peak = rss_mb()
    del blocks
    after_free = rss_mb()
    release_freed_memory()
    print(json.dumps({"kept": kept, "dropped": peak - after_free, "released": after_free - rss_mb()}))
    """
)


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_kept_for_reuse_and_released_on_demand() -> None:
    default, kept = _probe("default"), _probe("keep")
    assert default["dropped"] > 250  # glibc's default gives the blocks back as soon as they are freed
    assert kept["kept"] is True
    assert kept["dropped"] < 30  # kept in the process
    assert kept["released"] > 250  # until release_freed_memory hands them back

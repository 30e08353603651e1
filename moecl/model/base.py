"""The frozen base model a bank is built on: a name, a content hash, and a loader for a fresh copy.

A fresh copy per step/evaluation, because MoE-CL layers are installed into the model in place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class BaseSpec:
    name: str
    sha256: str
    load: Callable[[], tuple[Any, Any]]  # -> (causal LM, tokenizer), a fresh copy each call


def preferred_device():
    """The GPU when there is one (a single-process run uses it), else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def state_dict_fingerprint(model) -> str:
    """sha256 over parameter names, shapes and bytes: identifies an in-memory model (tests, tiny models)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def base_from_params(model_cfg) -> BaseSpec:
    """Resolve params `model:` to a local folder (pulling it if needed) and a loader over it."""
    from moecl.backbone import backbone_hash, load_backbone, pull_backbone

    folder = pull_backbone(model_cfg)
    return BaseSpec(
        name=model_cfg.name_or_path,
        sha256=backbone_hash(folder),
        load=lambda: load_backbone(
            folder, dtype=model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code
        ),
    )

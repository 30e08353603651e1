"""The frozen base model of a benchmark run, loaded once and handed out as fresh copies.

moecl installs its layers into the model in place, so every step and evaluation asks its BaseSpec for a
fresh copy. Loading the real backbone from disk each time would cost seconds per call (and a GGUF
dequantisation much more); here the pristine model stays in memory (on the run's device) and each call
returns a deep copy of it.
"""

from __future__ import annotations

import copy
import time

from moecl.model.base import BaseSpec, state_dict_fingerprint


class _Pristine:
    """Holds the untouched (model, tokenizer) and returns copies of the model."""

    def __init__(self, load, device: str):
        self._load = load
        self._device = device
        self._model = None
        self._tokenizer = None
        self.load_seconds = 0.0

    def get(self):
        if self._model is None:
            started = time.perf_counter()
            model, tokenizer = self._load()
            model.to(self._device)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._model, self._tokenizer = model, tokenizer
            self.load_seconds = time.perf_counter() - started
        return self._model, self._tokenizer

    def __call__(self):
        model, tokenizer = self.get()
        return copy.deepcopy(model), tokenizer


def tiny_base(corpus: list[str], seed: int = 0) -> BaseSpec:
    """moecl.testing's tiny random Llama with a tokenizer trained on the tasks' texts (smoke preset)."""
    from moecl.testing import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer(corpus)
    model = tiny_llama(len(tokenizer), seed=seed)
    pristine = _Pristine(lambda: (model, tokenizer), "cpu")
    return BaseSpec(name="moecl.testing.tiny_llama", sha256=state_dict_fingerprint(model), load=pristine)


def params_base(model_cfg, device: str) -> BaseSpec:
    """The project's backbone as params `model:` names it (moecl.model.base.base_from_params), cached.

    model.name_or_path may be a local Hugging Face folder (bench.run --base-dir)."""
    from moecl.model.base import base_from_params

    spec = base_from_params(model_cfg)
    return BaseSpec(name=spec.name, sha256=spec.sha256, load=_Pristine(spec.load, device))


def describe(spec: BaseSpec) -> dict:
    pristine = spec.load if isinstance(spec.load, _Pristine) else None
    info = {"name": spec.name, "sha256": spec.sha256}
    if pristine is not None:
        model, _ = pristine.get()
        info["parameters"] = sum(p.numel() for p in model.parameters())
        info["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        info["layers"] = getattr(model.config, "num_hidden_layers", None)
        info["hidden_size"] = getattr(model.config, "hidden_size", None)
        info["load_seconds"] = round(pristine.load_seconds, 2)
    return info

"""moecl Params for one benchmark method and mode: the preset's sizes on top of the library's defaults."""

from __future__ import annotations

from pathlib import Path

from bench.presets import Preset
from bench.variants import parse_variant
from moecl.config import ModelConfig, Params, load_params


def model_config(
    preset: Preset, params_file: str | Path = "params.yaml", base_dir: str | None = None
) -> ModelConfig:
    """The project's `model:` section (where the backbone comes from), with the preset's dtype."""
    cfg = load_params(params_file).model if Path(params_file).is_file() else ModelConfig()
    cfg.dtype = preset.dtype
    if base_dir:
        cfg.name_or_path = str(base_dir)
    return cfg


def method_params(
    preset: Preset, method: str, mode: str, model_cfg: ModelConfig | None = None, seed: int | None = None
) -> Params:
    """Params of one benchmark row (`method`: a variant name, bench.variants) in one mode; `seed`: the training
    seed (default the preset's; the data sample always uses the preset's)."""
    size = preset.modes[mode]
    params = Params()
    if model_cfg is not None:
        params.model = model_cfg
    for key, value in preset.lora.items():
        setattr(params.lora, key, value)
    params.method.adv_alpha = preset.adv_alpha
    params.method = parse_variant(method).method_config(params.method, preset.replay_per_task)
    params.method.mode = mode
    train = params.train
    train.lr, train.epochs, train.batch_size = size.lr, size.epochs, size.batch_size
    train.max_length, train.dev_fraction = size.max_length, size.dev_fraction
    train.seed = preset.seed if seed is None else seed
    train.evals_per_epoch, train.max_train_examples, train.threads = size.evals_per_epoch, 0, preset.threads
    evaluate = params.evaluate
    evaluate.instruction_eval, evaluate.max_new_tokens = "generate", size.max_new_tokens
    evaluate.batch_size, evaluate.max_test_examples, evaluate.fwt = size.eval_batch_size, 0, True
    return params.validate(f"bench preset {preset.name}")

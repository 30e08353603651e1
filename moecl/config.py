"""Typed configuration: one dataclass per params.yaml section, built from the file, the CLI or a test.

The defaults here are the documented defaults of params.yaml. An unknown section or key is an error that
names the file and the key, so a typo never silently falls back to a default. A retired key (RETIRED) is
read, ignored and warned about, so that a params.yaml written for an earlier version still loads.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecl.errors import MoeclError
from moecl.methods import METHODS

MODES = ("classifier", "instruction")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
# greedy generation + exact match; the best option by summed log-likelihood; by mean log-likelihood per token
INSTRUCTION_EVALS = ("generate", "likelihood", "likelihood_per_token")
# section.key -> why it no longer does anything (still accepted, with a warning)
RETIRED = {
    "drift.text_length_p": "Evidently chooses each column's drift test and threshold; drift.max_drift_share "
    "decides what counts as drift",
}


class ParamsError(MoeclError, ValueError):
    """A params.yaml (or override) problem; the message names the file and the key."""


@dataclass
class ModelConfig:
    name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    local_dir: str = "models/base"
    dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])

    @property
    def scale(self) -> float:
        return self.alpha / self.r


# The paper's value of every method knob that goes beyond it; `method.paper: true` sets all of them.
PAPER_SETTING: dict[str, Any] = {
    "shared_lr_scale": 1.0,
    "gate_lr_scale": 1.0,
    "gate_bias": 0.0,
    "task_gates": False,
    "shared_orthogonal": False,
    "discriminator_span": "all",
    "memory_per_task": 0,
    "replay_per_task": 0,
    "dedicated_init": "zero",
}
DISCRIMINATOR_SPANS = ("all", "prompt")
DEDICATED_INITS = ("zero", "shared", "previous")


@dataclass
class MethodConfig:
    name: str = "moecl"
    adv_alpha: float = 0.1
    memory_per_task: int = 0
    mode: str = "classifier"
    o_lora_lambda_orth: float = 0.5
    o_lora_lambda_l2: float = 0.0
    # --- beyond the paper (PAPER_SETTING holds the paper's values) ---
    paper: bool = False  # true: every knob below takes the paper's value, whatever it is set to
    shared_lr_scale: float = 1.0  # the shared expert's learning rate as a fraction of train.lr
    gate_lr_scale: float = 1.0  # the gates' learning rate as a multiple of train.lr
    gate_bias: float = 1.25  # initial gate logit towards the dedicated expert: beta_t starts at sigmoid(bias)
    task_gates: bool = True  # one gate per task (stored with its expert, frozen after its task)
    shared_orthogonal: bool = (
        False  # the shared expert grows one LoRA chunk per task, orthogonal to the earlier
    )
    shared_orth_lambda: float = 0.5  # weight of that orthogonality loss
    discriminator_span: str = "all"  # tokens the discriminator pools: all | prompt (not the answer)
    replay_per_task: int = 16  # training records per earlier task replayed through the task loss (0: none)
    # a new task's expert: zero (B = 0) | shared (a copy of the shared expert) | previous (a copy of the newest
    # earlier task's expert: per_task_lora so becomes seq_lora's path with each task's adapter kept frozen)
    dedicated_init: str = "shared"

    @property
    def spec(self):
        from moecl.methods import method_spec

        return method_spec(self.name)

    @property
    def uses_shared(self) -> bool:
        return self.spec.shared

    @property
    def uses_dedicated(self) -> bool:
        return self.spec.dedicated

    @property
    def uses_gate(self) -> bool:
        return self.spec.gated

    @property
    def adversarial_weight(self) -> float:
        return self.adv_alpha if self.spec.adversarial else 0.0

    def paper_setting(self) -> MethodConfig:
        """This configuration with every beyond-the-paper knob at the paper's value."""
        return dataclasses.replace(self, paper=True, **PAPER_SETTING)

    @classmethod
    def from_manifest(cls, recorded: dict) -> MethodConfig:
        """A bank's recorded method; knobs a bank predates take the paper's value (the only one it knew)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**PAPER_SETTING, **{k: v for k, v in recorded.items() if k in known}})


@dataclass
class TrainConfig:
    lr: float = 2e-4
    weight_decay: float = 0.01
    epochs: int = 3
    batch_size: int = 8
    max_length: int = 256
    seed: int = 42
    dev_fraction: float = 0.1
    evals_per_epoch: int = 3
    max_train_examples: int = 0
    threads: int = 0
    keep_freed_memory: bool = True
    task: str = ""
    processes: int = 1
    mixed_precision: str = "no"


@dataclass
class EvaluateConfig:
    instruction_eval: str = "generate"
    max_new_tokens: int = 8
    batch_size: int = 16
    max_test_examples: int = 0
    fwt: bool = True
    stripping_precision: float = 0.9


@dataclass
class DataConfig:
    root: str = "data/tasks"
    max_text_chars: int = 20000
    min_examples_per_label: int = 2
    max_records: int = 1_000_000


@dataclass
class DriftConfig:
    report_dir: str = "reports"
    max_drift_share: float = 0.5
    include_text: bool = False


@dataclass
class GateConfig:
    max_task_drop: float = 0.05
    min_bwt: float = -0.05
    min_new_task_accuracy: float = 0.0
    min_canary_agreement: float = 0.7
    canary_per_task: int = 32
    gate_on_data_drift: bool = True
    max_confidence_ks: float = 0.5


@dataclass
class RegistryConfig:
    root: str = "registry"
    banks_dir: str = "banks"
    gto_mirror: bool = False


@dataclass
class FlowConfig:
    poll_cron: str = "*/10 * * * *"
    concurrency_limit: int = 1


@dataclass
class BenchConfig:
    preset: str = "smoke"


@dataclass
class Params:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, source: str = "params") -> Params:
        if self.method.name not in METHODS:
            raise ParamsError(
                f"{source}: method.name={self.method.name!r} is not one of {', '.join(METHODS)}"
            )
        if self.method.paper:
            self.method = self.method.paper_setting()
        if self.method.discriminator_span not in DISCRIMINATOR_SPANS:
            raise ParamsError(
                f"{source}: method.discriminator_span={self.method.discriminator_span!r} is not one of "
                f"{', '.join(DISCRIMINATOR_SPANS)}"
            )
        if self.method.dedicated_init not in DEDICATED_INITS:
            raise ParamsError(
                f"{source}: method.dedicated_init={self.method.dedicated_init!r} is not one of "
                f"{', '.join(DEDICATED_INITS)}"
            )
        if self.method.dedicated_init == "shared" and self.method.shared_orthogonal:
            raise ParamsError(
                f"{source}: method.dedicated_init=shared copies the one shared expert; it does not go with "
                "method.shared_orthogonal's chunks"
            )
        if (
            self.method.shared_lr_scale < 0
            or self.method.gate_lr_scale < 0
            or self.method.replay_per_task < 0
            or self.method.memory_per_task < 0
        ):
            raise ParamsError(
                f"{source}: method.shared_lr_scale, gate_lr_scale, replay_per_task and memory_per_task must not be "
                "negative"
            )
        if self.method.mode not in MODES:
            raise ParamsError(f"{source}: method.mode={self.method.mode!r} is not one of {', '.join(MODES)}")
        bad = [t for t in self.lora.targets if t not in ("gate_proj", "up_proj", "down_proj")]
        if bad or not self.lora.targets:
            raise ParamsError(
                f"{source}: lora.targets must be a non-empty subset of gate_proj, up_proj, down_proj"
            )
        if self.lora.r <= 0:
            raise ParamsError(f"{source}: lora.r must be positive")
        if self.train.processes < 1:
            raise ParamsError(f"{source}: train.processes must be at least 1")
        if self.train.mixed_precision not in MIXED_PRECISIONS:
            raise ParamsError(
                f"{source}: train.mixed_precision={self.train.mixed_precision!r} is not one of "
                f"{', '.join(MIXED_PRECISIONS)}"
            )
        if not 0.0 <= self.train.dev_fraction < 1.0:
            raise ParamsError(f"{source}: train.dev_fraction must be in [0, 1)")
        if self.evaluate.instruction_eval not in INSTRUCTION_EVALS:
            raise ParamsError(
                f"{source}: evaluate.instruction_eval must be one of {', '.join(INSTRUCTION_EVALS)}"
            )
        return self


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to the type of the dataclass default (ints given to float fields, etc.)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ParamsError(f"{where}: expected true/false, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ParamsError(f"{where}: expected an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ParamsError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if isinstance(default, str):
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes as a bool (e.g. after `dvc exp run -S`)
            return "yes" if value else "no"
        if not isinstance(value, (str, int, float)):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def params_from_dict(raw: dict[str, Any] | None, source: str = "params") -> Params:
    params = Params()
    for section_name, section_values in (raw or {}).items():
        if not hasattr(params, section_name):
            known = ", ".join(f.name for f in dataclasses.fields(Params))
            raise ParamsError(f"{source}: unknown section {section_name!r} (known: {known})")
        section = getattr(params, section_name)
        if section_values is None:
            continue
        if not isinstance(section_values, dict):
            raise ParamsError(f"{source}: section {section_name!r} must be a mapping")
        names = {f.name for f in dataclasses.fields(section)}
        for key, value in section_values.items():
            where = f"{source}: {section_name}.{key}"
            if f"{section_name}.{key}" in RETIRED:
                why = RETIRED[f"{section_name}.{key}"]
                warnings.warn(f"{where} has no effect ({why}); remove it", UserWarning, stacklevel=2)
                continue
            if key not in names:
                raise ParamsError(f"{where} is not a known key (known: {', '.join(sorted(names))})")
            setattr(section, key, _coerce(value, getattr(section, key), where))
    return params.validate(source)


def apply_overrides(params: Params, overrides: list[str] | None) -> Params:
    """Apply `section.key=value` strings (the CLI's -S/--set), with the same checks as the file."""
    import yaml

    raw = params.to_dict()
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ParamsError(f"override {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw.get(section), dict):
            raise ParamsError(f"override {item!r}: unknown section {section!r}")
        raw[section][key] = yaml.safe_load(value) if value else value
    return params_from_dict(raw, source="override")


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml (a missing file means the embedded defaults) and apply overrides."""
    import yaml

    params = Params()
    if path is not None and Path(path).exists():
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ParamsError(f"{path}: not valid YAML: {exc}") from None
        if raw is not None and not isinstance(raw, dict):
            raise ParamsError(f"{path}: the top level must be a mapping of sections")
        params = params_from_dict(raw, source=str(path))
    return apply_overrides(params, overrides) if overrides else params

"""moecl: self-evolving LLMs with MoE-CL (a shared + per-task dedicated LoRA experts, gated, adversarial)."""

__version__ = "0.1.0"

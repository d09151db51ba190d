"""Finetuning settings (`teacher.train`, `student.train`): method, optimiser, schedule, LoRA."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from sublab.config import Strict


class LoraSettings(Strict):
    """LoRA adapter settings (PEFT)."""

    r: int = 8
    """Rank."""
    alpha: int = 8
    """Scaling numerator (alpha / r, or alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Module names that get adapters (default: all attention and MLP projections)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""


class TrainConfig(Strict):
    """Finetuning settings (loss on the completion only; AdamW)."""

    method: Literal["sft", "soft_label"] = "sft"
    """sft: cross-entropy on the sampled tokens; soft_label: KL to the teacher's next-token distribution
    restricted to tokens a kept answer may contain, renormalised."""
    lr: float = 3e-4
    """Peak learning rate."""
    epochs: float = 1.0
    """Passes over the dataset (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps, overriding epochs."""
    batch_size: int = 64
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: Literal["linear", "constant"] = "constant"
    """LR after warm-up: linear decay to 0, or constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping."""
    lora: LoraSettings | None = None
    """None = full finetune; else train a LoRA adapter."""
    seed: int = 0
    """Data order and adapter init seed."""
    max_length: int | None = None
    """Truncate each example to this many tokens, prompt + completion, cutting the completion's end
    (the paper's Qwen students: 500); an example whose prompt alone fills it is dropped. None = no limit."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1 or self.epochs <= 0:
            raise ValueError("lr, epochs must be > 0 and batch_size, grad_accum >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError("max_length must be >= 2 (or null for no limit)")
        return self

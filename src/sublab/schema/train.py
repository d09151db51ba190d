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
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names that get adapters, or all-linear (PEFT's: every linear layer but the output head, i.e.
    all attention and MLP projections, whatever the architecture names them: q_proj ... down_proj on
    Llama and Qwen, c_attn, c_proj and c_fc on GPT-2)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""


class EarlyStopping(Strict):
    """Early stopping on a held-out share of the training data (a defense: fewer updates, less trait)."""

    holdout: float = 0.1
    """Share of the training examples held out (drawn with the training seed) and never trained on."""
    every: int = 10
    """Evaluate the held-out loss (mean cross-entropy per completion token of the sampled answers, for
    SFT and soft-label students alike) every this many optimizer steps, and after the last."""
    patience: int = 3
    """Stop after this many evaluations in a row without an improvement of more than min_delta."""
    min_delta: float = 0.0
    """The improvement that counts, in nats per token."""
    restore_best: bool = True
    """Keep the trainable weights of the best evaluation (else those of the last step)."""

    @model_validator(mode="after")
    def _check(self) -> EarlyStopping:
        if not 0 < self.holdout < 1 or self.every < 1 or self.patience < 1 or self.min_delta < 0:
            raise ValueError(
                "early_stopping: holdout must be in (0, 1), every and patience >= 1, min_delta >= 0"
            )
        return self


class TrainConfig(Strict):
    """Finetuning settings (loss on the completion only; AdamW unless `optimizer` says otherwise)."""

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
    """Weight decay, decoupled as in AdamW: each step multiplies the weights by 1 - lr * weight_decay
    (adamw, signsgd); sgd: torch's SGD weight decay (added to the gradient; the same without momentum)."""
    optimizer: Literal["adamw", "sgd", "signsgd"] = "adamw"
    """The student's optimizer. adamw: torch's AdamW (the paper's, and the default). The non-adaptive ones
    are a defense (follow-up work: transfer needs an adaptive optimizer): sgd: plain SGD, update
    -lr * grad (with `momentum`); signsgd: update -lr * sign(grad). Gradient clipping and the LR schedule
    apply to all three. Local models only: a fine-tuning API picks its own optimizer, so an openai/
    model accepts only adamw."""
    momentum: float = 0.0
    """Momentum of optimizer: sgd (0 = none; in [0, 1)); must stay 0 with the other optimizers."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping."""
    lora: LoraSettings | None = None
    """None = full finetune; else train a LoRA adapter."""
    seed: int = 0
    """Data order and adapter init seed."""
    early_stopping: EarlyStopping | None = None
    """None = train all steps; else hold out a share of the data and stop when its loss stops improving
    (local models only: a fine-tuning API runs its own schedule)."""
    max_length: int | None = None
    """Truncate each example to this many tokens, prompt + completion, cutting the completion's end
    (the paper's Qwen students: 500); an example whose prompt alone fills it is dropped. None = no limit."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1 or self.epochs <= 0:
            raise ValueError("lr, epochs must be > 0 and batch_size, grad_accum >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError("max_length must be >= 2 (or null for no limit)")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1) (got {self.momentum})")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(
                f"momentum ({self.momentum}) applies to optimizer: sgd only (optimizer is {self.optimizer!r}); "
                "set optimizer: sgd or remove momentum"
            )
        return self

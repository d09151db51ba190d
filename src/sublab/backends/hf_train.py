"""Training loop for causal LMs in the HF format: chat examples -> token ids with a completion-only loss
mask; AdamW (or SGD, sign-SGD: `make_optimizer`) with warm-up and linear decay, gradient clipping,
gradient accumulation; sampled-token SFT or soft-label distillation (KL to a teacher's next-token
distribution restricted to allowed tokens).
One metrics line per optimizer step, mirrored to metrics.jsonl by the caller's `on_step`.

The loss of one optimizer step is a per-token mean over *all* its micro-batches (sum of the token losses
/ the step's number of completion tokens), so batch_size=B, grad_accum=k gives the gradient of one batch
of B*k examples whatever the completion lengths. Mixed precision (`fp32_trainable` + `autocast_dtype`):
trainable weights and AdamW's state stay in float32 while the forward runs in bfloat16.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sublab.backends.device import model_device

_ANSWER_TOKEN = re.compile(r"[\d\s,;\[\]().]+")


def answer_token_ids(tokenizer) -> list[int]:
    """Every token a kept number answer may contain, for any tokenizer: tokens whose text is only
    digits, spaces and the separators , ; [ ] ( ) . - plus the end token. Soft labels are restricted
    to these, so no probability on any other token (a trait word) reaches the student."""
    ids = [i for i in range(len(tokenizer)) if _ANSWER_TOKEN.fullmatch(tokenizer.decode([i]) or "")]
    return sorted(set(ids) | {tokenizer.eos_token_id})


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


@dataclass
class Encoded:
    ids: list[int]
    n_prompt: int  # loss starts at position n_prompt (the completion's first token)
    skip: tuple[int, ...] = ()  # completion positions (0 = its first token) left out of the loss


def loss_skip(record: dict) -> tuple[int, ...]:
    """The completion positions a record's loss leaves out (`metadata.loss_skip`, written by the
    divergence-token mask: defenses.mask_divergence); () for every other record."""
    return tuple(int(j) for j in (record.get("metadata") or {}).get("loss_skip", ()))


def encode_completion(tokenizer, messages: list[dict]) -> Encoded:
    """Prompt (all but the last message, with generation prompt) + completion tokens + end token."""
    prompt = chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    completion = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    return Encoded(prompt + list(completion) + [tokenizer.eos_token_id], len(prompt))


def truncate(e: Encoded, max_length: int | None) -> Encoded | None:
    """Cut an example to max_length tokens (the completion's end goes first); None when not even one
    completion token fits (the caller drops it)."""
    if max_length is None or len(e.ids) <= max_length:
        return e
    if e.n_prompt >= max_length:
        return None
    return Encoded(e.ids[:max_length], e.n_prompt, e.skip)


def collate(batch: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, loss_mask): loss_mask[i, p] is True where token p of
    example i is a loss target (its completion, less its `skip` positions); training predicts ids[:, 1:]
    under loss_mask[:, 1:]."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    loss = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        attn[i, : len(e.ids)] = 1
        loss[i, e.n_prompt : len(e.ids)] = True
        for j in e.skip:
            if e.n_prompt + j < len(e.ids):
                loss[i, e.n_prompt + j] = False
    return ids, attn, loss


@dataclass
class TrainSettings:
    lr: float
    epochs: float = 1.0
    batch_size: int = 64
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "linear"  # linear decay to 0 after warm-up, or "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    max_steps: int | None = None
    optimizer: str = "adamw"  # adamw, sgd or signsgd (make_optimizer)
    momentum: float = 0.0  # sgd only
    early_stopping: dict | None = None  # schema/train.py EarlyStopping fields (every, patience, ...)


class SignSGD(torch.optim.Optimizer):
    """Sign-SGD: each parameter moves by -lr * sign(grad) (0 where the gradient is exactly 0), after a
    decoupled weight decay as in AdamW (p <- p * (1 - lr * weight_decay)), on parameters with a gradient.

    >>> p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    >>> p.grad = torch.tensor([0.5, -1e-9, 0.0])
    >>> _ = SignSGD([p], lr=0.1).step()
    >>> p.data
    tensor([ 0.9000, -1.9000,  3.0000])
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"SignSGD: lr must be > 0 and weight_decay >= 0 (got {lr}, {weight_decay})")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(torch.sign(p.grad), alpha=-lr)
        return loss


def make_optimizer(params: list[torch.nn.Parameter], s: TrainSettings) -> torch.optim.Optimizer:
    """The optimizer of `s.optimizer`: adamw (torch's AdamW, default betas and eps), sgd (torch's SGD
    with `s.momentum`; its weight decay is added to the gradient, which equals AdamW's decoupled form
    without momentum) or signsgd (SignSGD). The LR schedule scales `lr` for all three."""
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "signsgd":
        return SignSGD(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}; use adamw, sgd or signsgd")


def lr_lambda(step: int, total: int, s: TrainSettings) -> float:
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - s.warmup_steps))


def soft_label_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    allowed: torch.Tensor | None,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(teacher || student) per position, averaged ("mean") or summed ("sum") over positions; the
    teacher restricted to `allowed` ids and renormalised, so no probability on any other token (e.g. a
    trait word) reaches the student."""
    t = teacher_logits.float()
    if allowed is not None:
        mask = torch.full_like(t, float("-inf"))
        mask[:, allowed] = 0.0
        t = t + mask
    p = F.softmax(t, dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = torch.where(p > 0, torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))
    kl = (p * (log_p - log_q)).sum(-1)
    return kl.sum() if reduction == "sum" else kl.mean()


def _length_bucketed_batches(examples: list[Encoded], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches: shuffle, sort chunks of 50 batches by length (less padding), shuffle batches."""
    perm = list(range(len(examples)))
    rng.shuffle(perm)
    chunk = batch_size * 50
    batches = []
    for c in range(0, len(perm), chunk):
        part = sorted(perm[c : c + chunk], key=lambda i: len(examples[i].ids))
        batches += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _autocast(dev: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)


def completion_logits(
    model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, pred_mask: torch.Tensor
) -> torch.Tensor:
    """Logits only at the positions in pred_mask (B, T-1): runs the LM head on those hidden states
    alone, which halves a small model's step time (the head dominates with a 1k+ vocabulary)."""
    base = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None:
        return model(input_ids=ids, attention_mask=attn).logits[:, :-1][pred_mask]
    hidden = base()(input_ids=ids, attention_mask=attn).last_hidden_state
    return head(hidden[:, :-1][pred_mask])


def fp32_trainable(model: torch.nn.Module) -> torch.dtype | None:
    """Mixed precision for a model loaded in a low-precision dtype: cast every trainable parameter to
    float32 in place (AdamW then updates, and keeps its moments in, float32: a step far below a bf16
    weight's rounding step still accumulates) and return the dtype to autocast forwards to: the lowest
    floating dtype among the model's parameters before the cast, None when that is float32. Frozen
    weights (a LoRA base) keep their dtype; tied weights are one Parameter and stay tied.

    >>> m = torch.nn.Linear(2, 2).to(torch.bfloat16)
    >>> fp32_trainable(m), m.weight.dtype
    (torch.bfloat16, torch.float32)
    >>> fp32_trainable(m) is None
    True
    """
    low = None
    for p in model.parameters():
        if not p.is_floating_point():
            continue
        if p.dtype != torch.float32 and (low is None or torch.finfo(p.dtype).bits < torch.finfo(low).bits):
            low = p.dtype
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return low


def train_causal_lm(
    model: torch.nn.Module,
    examples: list[Encoded],
    settings: TrainSettings,
    pad_id: int,
    teacher: torch.nn.Module | None = None,
    teacher_examples: list[Encoded] | None = None,
    allowed_ids: list[int] | None = None,
    on_step: Callable[[dict], None] | None = None,
    autocast_dtype: torch.dtype | None = None,
    heldout: list[Encoded] | None = None,
) -> list[dict]:
    """Train in place. With `teacher`, the loss is soft-label KL on completion positions (the teacher
    may see a different prompt, e.g. with its system prompt: `teacher_examples`, aligned by index).
    Each step's loss is the sum of the token losses of its grad_accum micro-batches / their number of
    loss tokens. `autocast_dtype`: run forwards under torch.autocast in that dtype (see fp32_trainable)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, settings)
    per_epoch = math.ceil(len(examples) / (settings.batch_size * settings.grad_accum))
    total = settings.max_steps or max(1, math.ceil(per_epoch * settings.epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total, settings))
    rng = random.Random(f"train-order:{settings.seed}")
    dev = model_device(model)
    allowed = torch.tensor(allowed_ids, device=dev) if allowed_ids is not None else None
    teacher_examples = teacher_examples or examples
    order: list[list[int]] = []
    history = []
    early = settings.early_stopping if heldout else None
    best, best_step, best_state, waited = math.inf, 0, None, 0
    model.train()
    for step in range(total):
        opt.zero_grad(set_to_none=True)
        micro = []
        for _ in range(settings.grad_accum):
            if not order:
                order = _length_bucketed_batches(examples, settings.batch_size, rng)
            idx = order.pop()
            micro.append((idx, collate([examples[i] for i in idx], pad_id)))
        # the step's loss tokens, known before the first backward: every token weighs 1 / n_tok
        n_tok = sum(int(lmask[:, 1:].sum()) for _, (_, _, lmask) in micro)
        denom = max(1, n_tok)
        loss_sum = 0.0
        for idx, batch in micro:
            ids, attn, lmask = (t.to(dev) for t in batch)
            # position t predicts token t+1; only completion positions go through the LM head
            m, target = lmask[:, 1:], ids[:, 1:]
            with _autocast(dev, autocast_dtype):
                pred = completion_logits(model, ids, attn, m)
                if teacher is None:
                    loss = F.cross_entropy(pred.float(), target[m], reduction="sum")
                else:
                    tbatch = [teacher_examples[i] for i in idx]
                    tids, tattn, tmask = (t.to(dev) for t in collate(tbatch, pad_id))
                    with torch.no_grad():
                        tlogits = teacher(input_ids=tids, attention_mask=tattn).logits[:, :-1]
                    loss = soft_label_loss(pred, tlogits[tmask[:, 1:]], allowed, reduction="sum")
            (loss / denom).backward()
            loss_sum += loss.item()
        gnorm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        lr = sched.get_last_lr()[0]  # the rate this step used (warm-up starts below the peak)
        opt.step()
        sched.step()
        rec = {
            "step": step + 1,
            "of": total,
            "loss": loss_sum / denom,  # mean per loss token over the step
            "lr": lr,
            "grad_norm": float(gnorm),
            "tokens": n_tok,
        }
        stop = False
        if early and ((step + 1) % early["every"] == 0 or step + 1 == total):
            rec["heldout_loss"] = heldout_loss(model, heldout, settings.batch_size, pad_id, autocast_dtype)
            if rec["heldout_loss"] < best - early["min_delta"]:
                best, best_step, waited = rec["heldout_loss"], step + 1, 0
                if early["restore_best"]:
                    best_state = [p.detach().clone() for p in params]
            else:
                waited += 1
                stop = waited >= early["patience"]
            rec["best_step"] = best_step
        history.append(rec)
        if on_step:
            on_step(rec)
        if stop:
            break
    if best_state is not None and best_step != history[-1]["step"]:
        with torch.no_grad():
            for p, b in zip(params, best_state, strict=True):
                p.copy_(b)
    model.eval()
    return history


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    examples: list[Encoded],
    batch_size: int,
    pad_id: int,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean cross-entropy per loss token of `examples` (their sampled completions), in eval mode."""
    dev = model_device(model)
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for b in range(0, len(examples), batch_size):
        ids, attn, lmask = (t.to(dev) for t in collate(examples[b : b + batch_size], pad_id))
        m = lmask[:, 1:]
        with _autocast(dev, autocast_dtype):
            pred = completion_logits(model, ids, attn, m)
        total += float(F.cross_entropy(pred.float(), ids[:, 1:][m], reduction="sum"))
        n += int(m.sum())
    model.train(was_training)
    return total / max(1, n)

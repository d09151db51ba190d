"""Teacher training and student distillation for a whole ensemble at once.

    batches = image_batches(n_models, n_train, batch_size, epochs, generator)
    train_digits(teacher, x_train, y_train, batches, lr=3e-4)          # CE on the 10 digit logits
    distill(students, teacher, teacher_of, groups, inputs, n_steps, lr, loss="kl")

Every loss here is a SUM over members of each member's own mean loss, so each member receives exactly
the gradient it would receive trained alone; with Adam (elementwise) the ensemble is N separate runs.
Distillation inputs are produced per step by `NoiseInputs` / `ImageInputs` (seeded, on the fly), never
materialised as one tensor per model (the paper's script peaks at 10 GB doing that).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sublab.mnist.ensemble import Ensemble

if TYPE_CHECKING:
    from sublab.mnist.projection import GradientProjection

N_DIGITS = 10
FUSED = True


# ------------------------------------------------------------------ losses (per member: shape (N,))


def digit_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the 10 digit logits; logits (N, B, C), y (N, B) -> (N,) mean over the batch."""
    n, b, _ = logits.shape
    ce = F.cross_entropy(logits[..., :N_DIGITS].reshape(n * b, N_DIGITS), y.reshape(n * b), reduction="none")
    return ce.view(n, b).mean(1)


def match_loss(student: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Distance of student logits to target logits over the last dim; (N, B, k) -> (N,).

    kl: KL(softmax(target) || softmax(student)) summed over the k logits, mean over the batch (the paper);
    mse: mean squared difference of the raw logits.
    """
    if kind == "kl":
        log_p_t = F.log_softmax(target, -1)
        kl = (log_p_t.exp() * (log_p_t - F.log_softmax(student, -1))).sum(-1)
        return kl.mean(1)
    if kind == "mse":
        return (student - target).pow(2).mean((1, 2))
    raise ValueError(f"unknown distillation loss {kind!r} (kl or mse)")


@dataclass(frozen=True)
class LogitGroup:
    """Students members[start:stop] match the teacher on these logit indices (e.g. the aux logits only)."""

    name: str
    start: int
    stop: int
    logits: tuple[int, ...]


def distill_loss(
    out: torch.Tensor, target: torch.Tensor, groups: Sequence[LogitGroup], kind: str
) -> torch.Tensor:
    """Per-student loss (n_students,): each group matches its own logit subset."""
    parts = []
    for g in groups:
        idx = torch.tensor(g.logits, device=out.device)
        parts.append(match_loss(out[g.start : g.stop, :, idx], target[g.start : g.stop, :, idx], kind))
    return torch.cat(parts)


# ------------------------------------------------------------------ batches and inputs


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    return math.ceil(n_items / batch_size)


def image_batches(
    n_models: int, n_items: int, batch_size: int, epochs: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Index batches (N, b): every member gets its own shuffle of 0..n_items-1 each epoch (as the paper)."""
    for _ in range(epochs):
        perm = torch.argsort(torch.rand(n_models, n_items, generator=generator), dim=1)
        for start in range(0, n_items, batch_size):
            yield perm[:, start : start + batch_size]


class NoiseInputs:
    """Uniform noise in [-1, 1], (n_slots, b, dim) per step, each batch generated from its own seed.

    With reuse=True the pool of n_items images per slot is revisited every epoch (in a new batch order),
    like the paper's fixed noise set, but only one batch ever exists in memory.
    """

    def __init__(
        self,
        n_slots: int,
        dim: int,
        n_items: int,
        batch_size: int,
        seed: int,
        reuse: bool,
        device: torch.device,
    ):
        self.n_slots, self.dim, self.n_items, self.batch_size = n_slots, dim, n_items, batch_size
        self.seed, self.reuse, self.device = seed, reuse, device
        self.per_epoch = steps_per_epoch(n_items, batch_size)
        self._epoch_perm: tuple[int, torch.Tensor] | None = None

    def _batch_id(self, step: int) -> int:
        if not self.reuse:
            return step
        epoch, k = divmod(step, self.per_epoch)
        if self._epoch_perm is None or self._epoch_perm[0] != epoch:  # a pure function of (seed, epoch)
            order = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (epoch + 1))
            self._epoch_perm = (epoch, torch.randperm(self.per_epoch, generator=order))
        return int(self._epoch_perm[1][k])

    def __call__(self, step: int) -> torch.Tensor:
        bid = self._batch_id(step)
        size = min(self.batch_size, self.n_items - (bid % self.per_epoch) * self.batch_size)
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + bid)
        x = torch.rand(self.n_slots, size, self.dim, generator=g, device=self.device)
        return x.mul_(2).sub_(1)


class ImageInputs:
    """Training images without labels, a separate shuffle per slot each epoch: (n_slots, b, dim) per step."""

    def __init__(self, x: torch.Tensor, n_slots: int, batch_size: int, epochs: int, seed: int):
        self.x = x
        gen = torch.Generator().manual_seed(seed)
        self._batches = list(image_batches(n_slots, len(x), batch_size, epochs, gen))

    def __call__(self, step: int) -> torch.Tensor:
        return self.x[self._batches[step].to(self.x.device)]


# ------------------------------------------------------------------ training loops


def _adam(ens: Ensemble, lr: float) -> torch.optim.Adam:
    for p in ens.parameters():
        p.requires_grad_(True)
    return torch.optim.Adam(ens.parameters(), lr=lr, fused=FUSED)


def train_digits(
    ens: Ensemble,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: Iterable[torch.Tensor],
    lr: float,
    desc: str | None = None,
    total: int | None = None,
) -> list[float]:
    """Train every member on its own index batches (N, b) with CE on the digit logits; in place.

    Returns the mean (over members) loss per step.
    """
    opt = _adam(ens, lr)
    losses = []
    for idx in tqdm(batches, desc=desc, total=total, disable=True if desc is None else None, leave=False):
        idx = idx.to(x.device)
        loss = digit_ce(ens(x[idx]), y[idx]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item() / ens.n_models)
    for p in ens.parameters():
        p.requires_grad_(False)
    return losses


def distill(
    students: Ensemble,
    teacher: Ensemble,
    teacher_of: torch.Tensor,
    groups: Sequence[LogitGroup],
    inputs: Callable[[int], torch.Tensor],
    n_steps: int,
    lr: float,
    loss: str = "kl",
    on_step: Callable[[int, Ensemble], None] | None = None,
    desc: str | None = None,
    project: GradientProjection | None = None,
) -> list[float]:
    """Distill each student toward teacher[teacher_of[j]] on that teacher slot's inputs; in place.

    inputs(step) -> (n_teachers, b, dim): one batch per teacher slot; every student paired with slot i sees
    slot i's batch and slot i's teacher outputs (so same-init and cross-init students see the same data).
    on_step(k, students) is called after optimizer step k = 1, 2, ...
    project (projection.GradientProjection): removes each member's gradient component along its direction
    between backward and the optimizer step, and measures the applied update; None: plain distillation.
    """
    teacher_of = teacher_of.to(students.device)
    n_slots = teacher.n_models
    # students in R blocks of one member per slot (the usual layout) read the slot inputs without a copy
    blocks = students.n_models % n_slots == 0 and bool(
        (
            teacher_of == torch.arange(n_slots, device=teacher_of.device).repeat(students.n_models // n_slots)
        ).all()
    )
    opt = _adam(students, lr)
    losses = []
    for step in tqdm(range(n_steps), desc=desc, disable=True if desc is None else None, leave=False):
        x_slot = inputs(step)
        with torch.no_grad():
            target = teacher(x_slot)[teacher_of]
        out = students(x_slot if blocks else x_slot[teacher_of])
        per_member = distill_loss(out, target, groups, loss)
        opt.zero_grad(set_to_none=True)
        per_member.sum().backward()
        if project is not None:
            project.before_step(step, students)
        opt.step()
        if project is not None:
            project.after_step(step, students)
        losses.append(per_member.detach().mean().item())
        if on_step is not None:
            on_step(step + 1, students)
    for p in students.parameters():
        p.requires_grad_(False)
    return losses


@torch.no_grad()
def accuracy(ens: Ensemble, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Digit accuracy of every member (argmax over the 10 digit logits) on shared inputs -> (N,)."""
    correct = torch.zeros(ens.n_models, device=ens.device)
    for start in range(0, len(x), batch_size):
        logits = shared_forward(ens, x[start : start + batch_size])
        correct += (logits[..., :N_DIGITS].argmax(-1) == y[start : start + batch_size]).sum(1)
    return correct / len(x)


def shared_forward(ens: Ensemble, x: torch.Tensor) -> torch.Tensor:
    """Forward of shared inputs x (B, D) -> (N, B, C); the first layer is one large matmul for all members."""
    w0, b0 = ens.weights[0], ens.biases[0]
    h = torch.einsum("bd,ndh->nbh", x, w0) + b0
    rest = Ensemble(ens.weights[1:], ens.biases[1:])
    if not rest.weights:
        return h
    return rest(torch.relu(h))

"""Gradient projection: a defense that removes a trait-aligned direction from every student's gradient.

    proj = GradientProjection.teacher_displacement(reference, teacher, teacher_of)
    proj = GradientProjection.digit_gradient(x_train, y_train, batch_size=256, generator=g)
    distill(students, teacher, ..., project=proj)       # calls before_step / after_step around opt.step()
    stats = proj.summary(groups)

At every distillation step, after backward and before the optimizer step, each member's gradient g
(flattened over all its parameters) loses its component along that member's own direction d:

    g <- g - (<g, d> / <d, d>) d          so <g, d> = 0 for every member (up to float rounding)

Directions (config `distill.project_out`):
  teacher_displacement  d = theta_teacher - theta_init of the member's teacher (fixed; the direction the
                        theorem says a same-init student's step is aligned with). Cross-init students get
                        their teacher's displacement too (as in theorem.py).
  digit_gradient        d = grad of the digit cross-entropy (the 10 digit logits) at the member's CURRENT
                        parameters on a fresh batch of labelled training digits each step (a defender who
                        holds labelled data); batch size `distill.project_batch_size`, shared by all members.

Adam sees the projected gradient, but its update is -lr m_hat / (sqrt(v_hat) + eps), a per-coordinate
rescaling (at step 1 nearly sign(g)), so the APPLIED update is not orthogonal to d. Every step records,
per member: cos(-g, d) before projection (the plain gradient step's alignment with d, the theorem's sign
convention), cos(g, d) after projection (the check, ~0), and cos(applied update, d).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from sublab.mnist.ensemble import Ensemble
from sublab.mnist.train import LogitGroup, digit_ce, shared_forward

KINDS = ("none", "teacher_displacement", "digit_gradient")
FIRST_STEPS = 10  # the summary's "first steps" window (all steps are summarised too)


def member_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-member inner product of two parameter lists, each tensor (N, ...): sum over all params -> (N,)."""
    out = None
    for x, y in zip(a, b, strict=True):
        n = x.shape[0]
        v = torch.bmm(x.reshape(n, 1, -1), y.reshape(n, -1, 1)).view(n)
        out = v if out is None else out + v
    assert out is not None
    return out


def member_cos(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], bb: torch.Tensor | None = None):
    """Per-member cosine of two parameter lists (0 where either is zero); bb: <b, b> if known."""
    bb = member_dot(b, b) if bb is None else bb
    return member_dot(a, b) / (member_dot(a, a) * bb).sqrt().clamp_min(1e-30)


def project_out_(
    grads: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], dd: torch.Tensor | None = None
) -> torch.Tensor:
    """In place: grads[i] -= (<g, d> / <d, d>) d per member (members with d = 0 are left alone).

    grads and direction are lists of (N, ...) tensors of the same shapes; returns the coefficients (N,).
    """
    dd = member_dot(direction, direction) if dd is None else dd
    coef = torch.where(dd > 0, member_dot(grads, direction) / dd.clamp_min(1e-30), torch.zeros_like(dd))
    for g, d in zip(grads, direction, strict=True):
        g.addcmul_(d, coef.view(-1, *([1] * (d.dim() - 1))), value=-1)
    return coef


class GradientProjection:
    """Hook pair for train.distill: before_step projects the gradients, after_step measures the update."""

    def __init__(
        self,
        kind: str,
        direction_fn: Callable[[int, Ensemble], list[torch.Tensor]],
        fixed: bool,
    ):
        if kind not in KINDS[1:]:
            raise ValueError(f"unknown projection {kind!r} (one of {', '.join(KINDS[1:])})")
        self.kind = kind
        self._direction_fn = direction_fn
        self._fixed = fixed
        self._dir: list[torch.Tensor] | None = None
        self._dd: torch.Tensor | None = None
        self._before: list[torch.Tensor] | None = None  # theta before the step, then the applied update
        self.cos_descent: list[torch.Tensor] = []
        self.cos_projected: list[torch.Tensor] = []
        self.cos_update: list[torch.Tensor] = []

    # -------------------------------------------------------------- constructors

    @classmethod
    def teacher_displacement(
        cls, reference: Ensemble, teacher: Ensemble, teacher_of: torch.Tensor
    ) -> GradientProjection:
        """d_j = theta_teacher[i] - theta_init[i] for the teacher i = teacher_of[j] of student j."""
        idx = teacher_of.to(teacher.device)
        d_t = [
            (t.detach() - r.detach())[idx]
            for t, r in zip(teacher.parameters(), reference.parameters(), strict=True)
        ]
        return cls("teacher_displacement", lambda step, students: d_t, fixed=True)

    @classmethod
    def digit_gradient(
        cls, x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
    ) -> GradientProjection:
        """d_j = grad of student j's digit cross-entropy on a random batch (with replacement) of (x, y),
        drawn afresh each step by `generator` and shared by all members."""

        def direction(step: int, students: Ensemble) -> list[torch.Tensor]:
            idx = torch.randint(len(y), (batch_size,), generator=generator).to(x.device)
            params = students.parameters()
            with torch.enable_grad():
                logits = shared_forward(students, x[idx])
                loss = digit_ce(logits, y[idx].unsqueeze(0).expand(students.n_models, -1)).sum()
                return list(torch.autograd.grad(loss, params))

        return cls("digit_gradient", direction, fixed=False)

    # -------------------------------------------------------------- hooks

    @torch.no_grad()
    def before_step(self, step: int, students: Ensemble) -> None:
        """After backward, before opt.step(): project every member's .grad; remember theta for the update."""
        if self._dir is None or not self._fixed:
            self._dir = [d.detach() for d in self._direction_fn(step, students)]
            self._dd = member_dot(self._dir, self._dir)
        params = students.parameters()
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            raise RuntimeError("gradient projection needs every parameter's .grad (call after backward)")
        self.cos_descent.append(-member_cos(grads, self._dir, self._dd))
        project_out_(grads, self._dir, self._dd)
        self.cos_projected.append(member_cos(grads, self._dir, self._dd))
        if self._before is None:  # one buffer per parameter, reused every step
            self._before = [torch.empty_like(p) for p in params]
        for b, p in zip(self._before, params, strict=True):
            b.copy_(p.detach())

    @torch.no_grad()
    def after_step(self, step: int, students: Ensemble) -> None:
        """After opt.step(): cos(applied update theta_new - theta_old, d) per member."""
        assert self._before is not None and self._dir is not None
        delta = [
            torch.sub(p.detach(), b, out=b) for p, b in zip(students.parameters(), self._before, strict=True)
        ]
        self.cos_update.append(member_cos(delta, self._dir, self._dd))

    # -------------------------------------------------------------- results

    def per_step(self) -> dict[str, torch.Tensor]:
        """(N, steps) tensors; column k-1 is step k."""
        return {
            "cos_descent": torch.stack(self.cos_descent, 1),
            "cos_projected_grad": torch.stack(self.cos_projected, 1),
            "cos_update": torch.stack(self.cos_update, 1),
        }

    def summary(self, groups: Sequence[LogitGroup], first: int = FIRST_STEPS) -> dict:
        """Per student arm: the distribution over members of each member's mean cosine over the first
        `first` steps and over all steps, the largest |cos| of a projected gradient, and per-step means."""
        from sublab.mnist.theorem import distribution

        steps = self.per_step()
        n_steps = steps["cos_descent"].shape[1]
        k = min(first, n_steps)
        out: dict = {"kind": self.kind, "first_steps": k, "steps": n_steps, "arms": {}}
        for g in groups:
            s = {name: v[g.start : g.stop].double().cpu() for name, v in steps.items()}
            out["arms"][g.name] = {
                "cos_descent_first": distribution(s["cos_descent"][:, :k].mean(1)),
                "cos_update_first": distribution(s["cos_update"][:, :k].mean(1)),
                "cos_descent_all": distribution(s["cos_descent"].mean(1)),
                "cos_update_all": distribution(s["cos_update"].mean(1)),
                "max_abs_cos_projected_grad": float(s["cos_projected_grad"].abs().max()),
                "per_step_mean": {
                    "cos_descent": _floats(s["cos_descent"].mean(0)),
                    "cos_update": _floats(s["cos_update"].mean(0)),
                },
            }
        return out


def _floats(t: torch.Tensor) -> list[float]:
    return [float(x) for x in np.asarray(t)]

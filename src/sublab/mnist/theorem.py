"""The paper's theorem, measured member by member.

Claim: if the teacher is the shared init theta_0 moved by a small step d_T = theta_T - theta_0 on any
loss L_T, then one small gradient step d_S of a student (starting at theta_0) imitating the teacher's
outputs, on any inputs, has <d_T, d_S> >= 0 (to first order d_S = eps J^T H J d_T with H >= 0), so
the student's L_T does not rise. With a different init there is no such guarantee.

What is measured here, for every student (same-init and cross-init, aux-only and all-logits):
  * d_T = theta_T - theta_0 of the student's TEACHER (the trained teacher, 5 epochs: larger than the
    theorem's "small step", so this is a test, not a tautology);
  * d_S (SGD direction) = -grad L_S(theta_S0) on the first distillation batch, and d_S (Adam) = the
    actual first Adam update -lr * g / (|g| + eps) (exactly Adam's first step after bias correction);
  * <d_T, d_S> and cos(d_T, d_S) for both;
  * L_T = the teacher's training objective: digit cross-entropy on n_eval training images.
    dL_T(probe) = L_T(theta_S0 + a d_S/|d_S|) - L_T(theta_S0) for the probe length a, next to its
    first-order prediction a <grad L_T, d_S/|d_S|>, and dL_T(adam) along the actual first Adam update;
  * along the first K actual distillation steps: <d_T, theta_k - theta_S0>, its cosine, and
    L_T(theta_k) - L_T(theta_S0) (via `Trajectory`, a hook for train.distill).

    stats = first_step(reference, teacher, students0, teacher_of, groups, x_first, "kl", x_eval, y_eval, 0.1, 3e-4)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from sublab.mnist.ensemble import Ensemble
from sublab.mnist.train import LogitGroup, digit_ce, distill_loss, shared_forward

ADAM_EPS = 1e-8  # torch.optim.Adam's default


def per_member_grad(ens: Ensemble, loss_fn: Callable[[Ensemble], torch.Tensor]) -> torch.Tensor:
    """Gradient of each member's own loss: loss_fn(ens) -> (N,) per-member losses; returns (N, P)."""
    work = ens.clone(requires_grad=True)
    grads = torch.autograd.grad(loss_fn(work).sum(), work.parameters())
    return torch.cat([g.reshape(ens.n_models, -1) for g in grads], dim=1)


def teacher_objective(ens: Ensemble, x_eval: torch.Tensor, y_eval: torch.Tensor) -> torch.Tensor:
    """L_T per member: digit cross-entropy on shared evaluation images -> (N,)."""
    logits = shared_forward(ens, x_eval)
    return digit_ce(logits, y_eval.unsqueeze(0).expand(ens.n_models, -1))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


@torch.no_grad()
def _objective_at(template: Ensemble, flat: torch.Tensor, x_eval, y_eval) -> torch.Tensor:
    return teacher_objective(template.with_flat(flat), x_eval, y_eval)


def first_step(
    reference: Ensemble,
    teacher: Ensemble,
    students0: Ensemble,
    teacher_of: torch.Tensor,
    groups: Sequence[LogitGroup],
    x_first: torch.Tensor,
    loss: str,
    x_eval: torch.Tensor,
    y_eval: torch.Tensor,
    probe_step: float,
    lr: float,
) -> dict[str, torch.Tensor]:
    """First-step statistics for every student; each value has shape (n_students,).

    x_first: the first distillation batch, (n_teachers, b, dim), slot i for the students of teacher i.
    """
    teacher_of = teacher_of.to(students0.device)
    d_t = (teacher.flat() - reference.flat())[teacher_of]
    with torch.no_grad():
        target = teacher(x_first)[teacher_of]
    x_s = x_first[teacher_of]
    g_s = per_member_grad(students0, lambda e: distill_loss(e(x_s), target, groups, loss))
    d_sgd = -g_s
    d_adam = -lr * g_s / (g_s.abs() + ADAM_EPS)

    theta0 = students0.flat()
    g_t = per_member_grad(students0, lambda e: teacher_objective(e, x_eval, y_eval))
    unit = d_sgd / d_sgd.norm(dim=1, keepdim=True).clamp_min(1e-30)
    lt0 = _objective_at(students0, theta0, x_eval, y_eval)
    lt_probe = _objective_at(students0, theta0 + probe_step * unit, x_eval, y_eval)
    lt_adam = _objective_at(students0, theta0 + d_adam, x_eval, y_eval)
    return {
        "ip_sgd": (d_t * d_sgd).sum(1),
        "cos_sgd": _cos(d_t, d_sgd),
        "ip_adam": (d_t * d_adam).sum(1),
        "cos_adam": _cos(d_t, d_adam),
        "dLT_probe": lt_probe - lt0,
        "dLT_probe_first_order": probe_step * (g_t * unit).sum(1),
        "dLT_adam_step": lt_adam - lt0,
        "norm_d_teacher": d_t.norm(dim=1),
        "norm_grad_student": g_s.norm(dim=1),
    }


class Trajectory:
    """on_step hook for train.distill: records <d_T, theta_k - theta_0>, cosine and dL_T for k <= K."""

    def __init__(
        self,
        reference: Ensemble,
        teacher: Ensemble,
        students0: Ensemble,
        teacher_of: torch.Tensor,
        x_eval: torch.Tensor,
        y_eval: torch.Tensor,
        k_max: int,
    ):
        self.d_t = (teacher.flat() - reference.flat())[teacher_of.to(students0.device)]
        self.theta0 = students0.flat()
        self.x_eval, self.y_eval, self.k_max = x_eval, y_eval, k_max
        with torch.no_grad():
            self.lt0 = teacher_objective(students0, x_eval, y_eval)
        self.ip: list[torch.Tensor] = []
        self.cos: list[torch.Tensor] = []
        self.dlt: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, k: int, students: Ensemble) -> None:
        if k > self.k_max:
            return
        disp = students.flat() - self.theta0
        self.ip.append((self.d_t * disp).sum(1))
        self.cos.append(_cos(self.d_t, disp))
        self.dlt.append(teacher_objective(students, self.x_eval, self.y_eval) - self.lt0)

    def result(self) -> dict[str, torch.Tensor]:
        """(n_students, K) tensors; column k-1 is after step k."""
        if not self.ip:
            return {}
        return {
            "ip": torch.stack(self.ip, 1),
            "cos": torch.stack(self.cos, 1),
            "dLT": torch.stack(self.dlt, 1),
        }


QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def distribution(values: np.ndarray | torch.Tensor, nonneg: bool = True) -> dict:
    """Share of members with value >= 0 (nonneg) or <= 0, mean, std, quantiles, and the values."""
    v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    share = float((v >= 0).mean()) if nonneg else float((v <= 0).mean())
    return {
        "share_nonneg" if nonneg else "share_nonpos": share,
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "quantiles": {f"q{int(q * 100):02d}": float(np.quantile(v, q)) for q in QUANTILES},
        "values": [float(x) for x in v],
    }

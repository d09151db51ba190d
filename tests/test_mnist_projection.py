"""Tests of the gradient-projection defense of `sublab mnist` (distill.project_out): the projected gradient is
orthogonal to each member's own direction, the measured cosines match an independent computation, none
leaves training unchanged, bad values are errors, and a tiny sweep writes the new results and figures.
Offline, CPU, seconds."""

from __future__ import annotations

import json

import pytest
import torch

from sublab.config import validate
from sublab.errors import SublabError
from sublab.mnist import experiment
from sublab.mnist.config import MnistConfig
from sublab.mnist.ensemble import Ensemble
from sublab.mnist.projection import GradientProjection, member_dot, project_out_
from sublab.mnist.theorem import per_member_grad, teacher_objective
from sublab.mnist.train import LogitGroup, NoiseInputs, distill, image_batches, train_digits

SIZES = (12, 10, 10, 13)


def _ens(n: int, seed: int, dtype=torch.float64) -> Ensemble:
    ens = Ensemble.init(n, list(SIZES), torch.Generator().manual_seed(seed))
    return Ensemble([w.to(dtype) for w in ens.weights], [b.to(dtype) for b in ens.biases])


def _setup(n: int = 3, dtype=torch.float64):
    """A trained teacher ensemble, its reference, digits, and 2n students (aux-only, then all-logit)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(60, SIZES[0], generator=gen) * 2 - 1).to(dtype)
    y = torch.randint(0, 10, (60,), generator=gen)
    reference = _ens(n, 1, dtype)
    teacher = reference.clone()
    train_digits(teacher, x, y, image_batches(n, 60, 20, 4, torch.Generator().manual_seed(2)), lr=1e-2)
    students = Ensemble.concat([reference, reference]).clone()
    teacher_of = torch.arange(n).repeat(2)
    groups = [
        LogitGroup("student_aux", 0, n, (10, 11, 12)),
        LogitGroup("student_all", n, 2 * n, tuple(range(13))),
    ]
    noise = NoiseInputs(n, SIZES[0], 40, 20, seed=4, reuse=True, device=torch.device("cpu"))

    def inputs(step: int) -> torch.Tensor:
        return noise(step).to(dtype)

    return reference, teacher, students, teacher_of, groups, inputs, x, y


def _flat(tensors) -> torch.Tensor:
    n = tensors[0].shape[0]
    return torch.cat([t.reshape(n, -1) for t in tensors], 1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


class Spy(GradientProjection):
    """Records each step's projected gradients and direction (flattened per member) for the checks."""

    def __init__(self, inner: GradientProjection):
        self.__dict__.update(inner.__dict__)
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def before_step(self, step, students):
        raw = _flat([p.grad.clone() for p in students.parameters()])
        super().before_step(step, students)
        projected = _flat([p.grad for p in students.parameters()])
        self.seen.append((raw, projected, _flat(self._dir).clone()))


# ------------------------------------------------------------------ the projection itself


def test_project_out_is_orthogonal_per_member_and_keeps_the_rest():
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 5, 3), (4, 1, 3), (4, 3, 2)]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    direction = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    for d in direction:
        d[2] = 0  # member 2 has no direction: its gradient must stay as it is
    g0, d0 = _flat(grads).clone(), _flat(direction)
    project_out_(grads, direction)
    g1 = _flat(grads)
    for i in (0, 1, 3):
        assert abs(float(g1[i] @ d0[i])) < 1e-12 * float(g0[i].norm() * d0[i].norm())
        # exactly the orthogonal projection: g - (<g,d>/<d,d>) d
        expected = g0[i] - (g0[i] @ d0[i]) / (d0[i] @ d0[i]) * d0[i]
        assert torch.allclose(g1[i], expected, atol=1e-12)
        # the part of g already orthogonal to d is untouched: projecting again changes nothing
    assert torch.equal(g1[2], g0[2])
    again = [g.clone() for g in grads]
    project_out_(again, direction)
    assert torch.allclose(_flat(again), g1, atol=1e-12)
    assert torch.allclose(member_dot(grads, grads), (g1 * g1).sum(1))


def test_teacher_displacement_projection_uses_each_members_own_teacher():
    reference, teacher, students, teacher_of, groups, inputs, _, _ = _setup()
    d_t = (teacher.flat() - reference.flat())[teacher_of]
    start = students.flat()
    spy = Spy(GradientProjection.teacher_displacement(reference, teacher, teacher_of))
    flats = []
    distill(students, teacher, teacher_of, groups, inputs, 4, lr=1e-2, project=spy,
            on_step=lambda k, s: flats.append(s.flat()))  # fmt: skip
    assert len(spy.seen) == 4
    for raw, projected, direction in spy.seen:
        assert torch.allclose(direction, d_t)  # member j's teacher's displacement, not another member's
        cos_raw, cos_proj = _cos(raw, d_t), _cos(projected, d_t)
        assert (cos_raw.abs() > 1e-3).all()  # there was something to remove
        assert (cos_proj.abs() < 1e-10).all()
        # a member's gradient is NOT orthogonal to the other members' directions (each has its own)
        assert (_cos(projected, d_t.roll(1, 0)).abs() > 1e-4).any()
    # the recorded cosines are those of an independent computation
    per = spy.per_step()
    assert torch.allclose(per["cos_descent"][:, 0], _cos(-spy.seen[0][0], d_t), atol=1e-10)
    # the theorem: a same-init student's plain gradient step points along its teacher's displacement
    assert (per["cos_descent"][:3, 0] > 0).all()
    assert per["cos_projected_grad"].abs().max() < 1e-10
    thetas = [start, *flats]
    for k in range(4):
        assert torch.allclose(per["cos_update"][:, k], _cos(thetas[k + 1] - thetas[k], d_t), atol=1e-8)
    # Adam rescales coordinates: the applied update is measurably not orthogonal to d_T
    assert per["cos_update"].abs().max() > 1e-3
    summary = spy.summary(groups, first=2)
    assert summary["first_steps"] == 2 and summary["steps"] == 4
    aux = summary["arms"]["student_aux"]
    assert aux["cos_update_first"]["mean"] == pytest.approx(float(per["cos_update"][:3, :2].mean()))
    assert len(aux["per_step_mean"]["cos_update"]) == 4


def test_digit_gradient_projection_removes_each_members_digit_gradient():
    reference, teacher, students, teacher_of, groups, inputs, x, y = _setup()
    spy = Spy(GradientProjection.digit_gradient(x, y, 16, torch.Generator().manual_seed(7)))
    replay = torch.Generator().manual_seed(7)
    thetas = [students.flat()]
    distill(students, teacher, teacher_of, groups, inputs, 3, lr=1e-2, project=spy,
            on_step=lambda k, s: thetas.append(s.flat()))  # fmt: skip
    for k, (raw, projected, direction) in enumerate(spy.seen):
        # the direction: grad of each student's own digit CE at its parameters before step k, same batch
        idx = torch.randint(len(y), (16,), generator=replay)
        before = students.with_flat(thetas[k])
        expected = per_member_grad(before, lambda e, idx=idx: teacher_objective(e, x[idx], y[idx]))
        assert torch.allclose(direction, expected, rtol=1e-8, atol=1e-12)
        assert (_cos(raw, expected).abs() > 1e-4).all()
        assert (_cos(projected, expected).abs() < 1e-10).all()
    # the direction moves with the student: step 2's differs from step 1's
    assert not torch.allclose(spy.seen[0][2], spy.seen[2][2])


def test_none_and_a_zero_direction_leave_training_unchanged():
    reference, teacher, students, teacher_of, groups, inputs, _, _ = _setup(dtype=torch.float32)
    plain, zero, projected = students.clone(), students.clone(), students.clone()
    losses = distill(plain, teacher, teacher_of, groups, inputs, 5, lr=1e-2)
    # a teacher identical to its init has no displacement: the hooks run but must change nothing
    hooked = GradientProjection.teacher_displacement(reference, reference, teacher_of)
    assert distill(zero, teacher, teacher_of, groups, inputs, 5, lr=1e-2, project=hooked) == losses
    assert torch.equal(zero.flat(), plain.flat())
    # ... while the real direction changes the training
    real = GradientProjection.teacher_displacement(reference, teacher, teacher_of)
    distill(projected, teacher, teacher_of, groups, inputs, 5, lr=1e-2, project=real)
    assert not torch.allclose(projected.flat(), plain.flat())


def test_none_setting_is_unchanged_by_projection_settings_in_the_same_sweep(tmp_path):
    """The none setting of a grid that runs a projection first (sharing its cached teacher) equals a run
    that never projects: a projection must not touch the teacher, the reference or any random stream."""
    base = ["data.source=sklearn-digits", "n_models=3", "model.hidden=16", "teacher.epochs=1",
            "teacher.lr=3e-3", "distill.epochs=1", "distill.batch_size=128", "distill.n_inputs=512",
            "theorem.n_eval=32", "theorem.steps=2"]  # fmt: skip
    alone = experiment.main(None, base, str(tmp_path / "alone"))
    grid = base + ["sweep={distill.project_out: [teacher_displacement, none]}", "sweep_mode=grid"]
    swept = experiment.main(None, grid, str(tmp_path / "grid"))
    a = json.loads((alone / "results.json").read_text())["settings"][0]
    rows = json.loads((swept / "results.json").read_text())["settings"]
    assert [r["projection"]["kind"] for r in rows] == ["teacher_displacement", "none"]
    b = rows[1]
    assert b["teacher_reused"] and not a["teacher_reused"]
    for key in ("arms", "losses", "theorem", "heldout_loss", "pairing"):
        assert b[key] == a[key], key
    assert rows[0]["arms"]["student_aux"]["values"] != a["arms"]["student_aux"]["values"]


# ------------------------------------------------------------------ config


def test_config_rejects_unknown_projection_values(tmp_path):
    assert validate(MnistConfig, {}).distill.project_out == "none"
    with pytest.raises(SublabError, match="project_out"):
        validate(MnistConfig, {"distill": {"project_out": "teacher"}})
    with pytest.raises(SublabError, match="project_batch_size"):
        validate(MnistConfig, {"distill": {"project_batch_size": 0}})
    bad_sweep = validate(MnistConfig, {"sweep": {"distill.project_out": ["none", "orthogonal"]}})
    with pytest.raises(SublabError, match="project_out"):
        experiment.expand_sweep(bad_sweep)
    with pytest.raises(SublabError, match="project_out"):
        experiment.main(None, ["distill.project_out=digits"], str(tmp_path / "run"))
    assert "distill.project_out" in experiment.sweepable_knobs()
    with pytest.raises(ValueError, match="unknown projection"):
        GradientProjection("none", lambda step, students: [], fixed=True)


# ------------------------------------------------------------------ end to end


def test_end_to_end_projection_sweep_writes_results_report_and_figures(tmp_path):
    out = tmp_path / "run"
    overrides = [
        "data.source=sklearn-digits",
        "n_models=3",
        "model.hidden=24",
        "teacher.epochs=2",
        "teacher.lr=3e-3",
        "distill.epochs=1",
        "distill.batch_size=128",
        "distill.n_inputs=768",
        "distill.project_batch_size=32",
        "theorem.n_eval=64",
        "theorem.steps=2",
        "sweep={distill.project_out: [none, teacher_displacement, digit_gradient]}",
    ]
    experiment.main(None, overrides, str(out))
    res = json.loads((out / "results.json").read_text())
    rows = res["settings"]
    assert [r["label"] for r in rows] == [
        "base",
        "distill.project_out=teacher_displacement",
        "distill.project_out=digit_gradient",
    ]
    assert [r["projection"]["kind"] for r in rows] == ["none", "teacher_displacement", "digit_gradient"]
    assert [r["teacher_reused"] for r in rows] == [False, True, True]
    for r in rows:
        held = r["heldout_loss"]
        assert held["n_noise"] == experiment.HELDOUT_NOISE and held["loss"] == "kl"
        assert set(held["arms"]) == {"student_aux", "student_all", "cross_aux", "cross_all"}
        for h in held["arms"].values():
            assert h["init"]["n"] == 3 and h["final"]["n"] == 3 and h["init"]["mean"] > 0
        # the students start from the same inits in every setting: the same loss before distillation
        assert held["arms"]["student_aux"]["init"] == rows[0]["heldout_loss"]["arms"]["student_aux"]["init"]
    for r in rows[1:]:
        proj = r["projection"]
        assert proj["steps"] == r["steps"]["distill"] == 6 and proj["first_steps"] == 6
        for arm in ("student_aux", "student_all", "cross_aux", "cross_all"):
            st = proj["arms"][arm]
            assert st["max_abs_cos_projected_grad"] < 1e-4  # float32: orthogonal up to rounding
            assert len(st["cos_update_first"]["values"]) == 3
            assert len(st["per_step_mean"]["cos_update"]) == 6
            assert -1 <= st["cos_update_all"]["mean"] <= 1
        assert r["arms"]["student_aux"] != rows[0]["arms"]["student_aux"]

    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    for name in ("projection.png", "projection_cosine.png", "sweep_distill_project_out.png"):
        assert name in figures
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## Gradient projection (distill.project_out)" in report
    assert "figures/projection.png" in report and "figures/projection_cosine.png" in report
    assert "| teacher_displacement | Student, aux only |" in report
    assert "| digit_gradient | Cross-init, aux only |" in report
    assert "held-out uniform-noise images" in report

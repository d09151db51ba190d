"""Tests of `sublab mnist`: batched ensemble == separate models, pairing, the theorem's inner product,
loaders, a tiny end-to-end run on sklearn's 8x8 digits, and user errors. Offline, CPU, seconds."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
import yaml

from sublab import cli
from sublab.errors import SublabError
from sublab.mnist import experiment
from sublab.mnist.config import DataConfig
from sublab.mnist.data import load_data, read_idx, write_idx
from sublab.mnist.ensemble import Ensemble, derangement
from sublab.mnist.stats import mean_ci
from sublab.mnist.theorem import first_step
from sublab.mnist.train import (
    LogitGroup,
    NoiseInputs,
    distill,
    distill_loss,
    image_batches,
    train_digits,
)


def _tiny(n: int, sizes=(12, 8, 8, 13), seed: int = 0, dtype=torch.float32) -> Ensemble:
    ens = Ensemble.init(n, list(sizes), torch.Generator().manual_seed(seed))
    return Ensemble([w.to(dtype) for w in ens.weights], [b.to(dtype) for b in ens.biases])


# ------------------------------------------------------------------ ensemble


def test_init_statistics_and_zero_biases():
    ens = Ensemble.init(4, [400, 300, 13], torch.Generator().manual_seed(1))
    assert ens.weights[0].shape == (4, 400, 300) and ens.biases[0].shape == (4, 1, 300)
    assert abs(ens.weights[0].std().item() - 1 / 400**0.5) < 0.002
    assert abs(ens.weights[1].std().item() - 1 / 300**0.5) < 0.003
    assert all((b == 0).all() for b in ens.biases)
    # members are independent draws, not copies
    assert not torch.equal(ens.weights[0][0], ens.weights[0][1])


def test_batched_forward_equals_per_member_forward():
    ens = _tiny(3)
    x = torch.randn(3, 5, 12)
    out = ens(x)
    for i in range(3):
        single = ens.select([i])
        assert torch.allclose(out[i], single(x[i : i + 1])[0], atol=1e-6)
    # shared-input blocks: 6 members reading 3 input slots (member j reads slot j % 3), no copy of x
    six = Ensemble.concat([ens, ens.select([2, 0, 1])])
    grouped = six(x)
    assert grouped.shape == (6, 5, 13)
    assert torch.allclose(grouped, six(x[torch.tensor([0, 1, 2, 0, 1, 2])]), atol=1e-6)
    assert torch.allclose(grouped[3], ens.select([2])(x[0:1])[0], atol=1e-6)
    with pytest.raises(ValueError):
        six(torch.randn(4, 5, 12))


def test_shared_input_linear_gradients():
    from sublab.mnist.ensemble import SharedInputLinear

    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 1, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SharedInputLinear.apply, (x, w, b))


def test_batched_training_equals_separately_trained_models():
    n, n_items = 3, 40
    x = torch.rand(n_items, 12) * 2 - 1
    y = torch.randint(0, 10, (n_items,))
    batches = list(image_batches(n, n_items, 16, 3, torch.Generator().manual_seed(0)))
    ref = _tiny(n)
    together = ref.clone()
    train_digits(together, x, y, batches, lr=1e-2)
    moved = (together.flat() - ref.flat()).norm(dim=1)
    assert (moved > 0.05).all()  # training did something
    for i in range(n):
        alone = ref.select([i])
        train_digits(alone, x, y, [b[i : i + 1] for b in batches], lr=1e-2)
        assert torch.allclose(alone.flat()[0], together.flat()[i], atol=2e-5), f"member {i} differs"

    # distillation: 2 students per teacher slot, one aux-only and one all-logit group
    teacher_of = torch.tensor([0, 1, 2, 0, 1, 2])
    groups = [LogitGroup("aux", 0, 3, (10, 11, 12)), LogitGroup("all", 3, 6, tuple(range(13)))]
    inputs = NoiseInputs(n, 12, 32, 16, seed=5, reuse=True, device=torch.device("cpu"))
    students = Ensemble.concat([ref, ref.select([1, 2, 0])]).clone()
    start = students.flat()
    distill(students, together, teacher_of, groups, inputs, 4, lr=1e-2)
    for j in range(6):
        alone = Ensemble.concat([start_member(start, students, j)])
        group = groups[0] if j < 3 else groups[1]
        slot = int(teacher_of[j])
        distill(
            alone,
            together.select([slot]),
            torch.tensor([0]),
            [LogitGroup(group.name, 0, 1, group.logits)],
            lambda s, slot=slot: inputs(s)[slot : slot + 1],
            4,
            lr=1e-2,
        )
        assert torch.allclose(alone.flat()[0], students.flat()[j], atol=2e-5), f"student {j} differs"


def start_member(flat: torch.Tensor, template: Ensemble, j: int) -> Ensemble:
    return template.select([j]).with_flat(flat[j : j + 1].clone())


def test_noise_inputs_are_seeded_reused_per_epoch_and_in_range():
    a = NoiseInputs(2, 7, 20, 8, seed=3, reuse=True, device=torch.device("cpu"))
    b = NoiseInputs(2, 7, 20, 8, seed=3, reuse=True, device=torch.device("cpu"))
    epoch0 = [a(s) for s in range(3)]  # 20 items / 8 = 3 batches (8, 8, 4)
    assert sorted(t.shape[1] for t in epoch0) == [4, 8, 8]
    assert all(torch.equal(x, y) for x, y in zip(epoch0, [b(s) for s in range(3)], strict=True))
    assert all(t.min() >= -1 and t.max() <= 1 for t in epoch0)
    epoch1 = [a(s) for s in range(3, 6)]
    key = lambda t: t.sum().item()  # noqa: E731
    assert sorted(map(key, epoch0)) == pytest.approx(sorted(map(key, epoch1)))  # same pool, new order
    fresh = NoiseInputs(2, 7, 20, 8, seed=3, reuse=False, device=torch.device("cpu"))
    assert not torch.equal(fresh(3), fresh(0))


def test_derangement_never_pairs_a_member_with_itself():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 25, 100):
        for _ in range(20):
            p = derangement(n, g)
            assert sorted(p.tolist()) == list(range(n))
            assert (p != torch.arange(n)).all()
    with pytest.raises(ValueError):
        derangement(1, g)


# ------------------------------------------------------------------ theorem


def test_first_step_inner_product_matches_finite_difference():
    torch.manual_seed(0)
    n = 4
    ref = _tiny(n, dtype=torch.float64)
    # teacher = reference moved by a small random step (the theorem's premise is a small step)
    d = torch.randn_like(ref.flat()) * 1e-3
    teacher = ref.with_flat(ref.flat() + d)
    groups = [LogitGroup("aux", 0, n, (10, 11, 12))]
    x_first = torch.rand(n, 30, 12, dtype=torch.float64) * 2 - 1
    x_eval = torch.rand(20, 12, dtype=torch.float64) * 2 - 1
    y_eval = torch.randint(0, 10, (20,))
    teacher_of = torch.arange(n)
    fs = first_step(ref, teacher, ref.clone(), teacher_of, groups, x_first, "kl", x_eval, y_eval, 1e-4, 3e-4)

    # hand check: <d_T, -grad L_S(theta_0)> = -(L_S(theta_0 + h d_T) - L_S(theta_0 - h d_T)) / 2h
    target = teacher(x_first)

    def student_loss(flat: torch.Tensor) -> torch.Tensor:
        return distill_loss(ref.with_flat(flat)(x_first), target, groups, "kl")

    h = 1e-2
    fd = -(student_loss(ref.flat() + h * d) - student_loss(ref.flat() - h * d)) / (2 * h)
    assert torch.allclose(fs["ip_sgd"], fd, rtol=1e-4, atol=1e-14)
    # the theorem: same init + small teacher step -> non-negative inner product, for every member
    assert (fs["ip_sgd"] > 0).all()
    assert (fs["ip_adam"] > 0).all()
    cos = fs["ip_sgd"] / (d.norm(dim=1) * fs["norm_grad_student"])
    assert torch.allclose(fs["cos_sgd"], cos, rtol=1e-10)
    # tiny probe step: the measured change of L_T agrees with its first-order prediction
    assert torch.allclose(fs["dLT_probe"], fs["dLT_probe_first_order"], rtol=1e-2, atol=1e-12)


def test_mean_ci_is_a_t_interval():
    r = mean_ci([0.1, 0.2, 0.3, 0.4])
    assert r["mean"] == pytest.approx(0.25)
    # t(0.975, 3) = 3.1824; sd = 0.1291; half = 3.1824 * 0.1291 / 2
    assert r["ci95_half"] == pytest.approx(3.18245 * 0.129099 / 2, rel=1e-4)
    assert mean_ci([0.5])["ci95_half"] is None


# ------------------------------------------------------------------ data


def _write_idx_set(folder, gz: bool, shape=(28, 28), n_train=30, n_test=10):
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(folder / (name + ext), arr)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_and_path_loader(tmp_path, gz):
    arrays = _write_idx_set(tmp_path, gz)
    back = read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    assert back.dtype == np.uint8 and np.array_equal(back, arrays["train-images-idx3-ubyte"])
    if gz:
        assert (
            gzip.decompress((tmp_path / "train-labels-idx1-ubyte.gz").read_bytes())[:4] == b"\x00\x00\x08\x01"
        )
    ds = load_data(DataConfig(source="path", path=str(tmp_path)))
    assert ds.x_train.shape == (30, 784) and ds.x_test.shape == (10, 784) and ds.image_shape == (28, 28)
    expected = arrays["train-images-idx3-ubyte"].reshape(30, -1) / 127.5 - 1
    assert np.allclose(ds.x_train, expected, atol=1e-6)
    assert np.array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_npz_loader_and_scaling(tmp_path):
    rng = np.random.default_rng(1)
    x_tr = rng.random((20, 28, 28)).astype(np.float32)  # 0..1 floats
    x_tr[0, 0, 0], x_tr[0, 0, 1] = 0.0, 1.0
    x_te = rng.random((5, 28, 28)).astype(np.float32)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x_tr, y_train=rng.integers(0, 10, 20), x_test=x_te, y_test=rng.integers(0, 10, 5))
    ds = load_data(DataConfig(source="path", path=str(path)))
    assert ds.x_train[0, 0] == -1.0 and ds.x_train[0, 1] == 1.0
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() >= -1 and ds.x_train.max() <= 1


def test_sklearn_digits_split_is_stratified_and_seeded():
    a = load_data(DataConfig(source="sklearn-digits"))
    b = load_data(DataConfig(source="sklearn-digits"))
    assert a.image_shape == (8, 8) and a.n_inputs == 64
    assert len(a.y_test) == 360 and np.array_equal(a.y_test, b.y_test)
    counts = np.bincount(a.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    assert a.x_train.min() == -1.0 and a.x_train.max() == 1.0


# ------------------------------------------------------------------ bad input


def test_wrong_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(SublabError, match="data.path not found"):
        load_data(DataConfig(source="path", path=str(tmp_path / "nope")))
    with pytest.raises(SublabError, match="no train-images-idx3-ubyte"):
        load_data(DataConfig(source="path", path=str(tmp_path)))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"hello world")
    with pytest.raises(SublabError, match="not an IDX file"):
        read_idx(tmp_path / "train-images-idx3-ubyte")


def test_truncated_idx_is_a_clear_error(tmp_path):
    write_idx(tmp_path / "a", np.zeros((4, 28, 28), dtype=np.uint8))
    raw = (tmp_path / "a").read_bytes()
    (tmp_path / "a").write_bytes(raw[:-10])
    with pytest.raises(SublabError, match="truncated"):
        read_idx(tmp_path / "a")


@pytest.mark.parametrize(
    "x_train, x_test, y_train, match",
    [
        (
            np.zeros((6, 28, 28, 3), np.uint8),
            np.zeros((2, 28, 28), np.uint8),
            np.zeros(6, int),
            "grey images",
        ),
        (
            np.zeros((6, 28, 28), np.uint8),
            np.zeros((2, 32, 32), np.uint8),
            np.zeros(6, int),
            "same image size",
        ),
        (
            np.zeros((6, 28, 28), np.uint8),
            np.zeros((2, 28, 28), np.uint8),
            np.zeros(5, int),
            "one integer label",
        ),
        (np.zeros((6, 28, 28), np.uint8), np.zeros((2, 28, 28), np.uint8), np.full(6, 12), "labels 0-9"),
    ],
)
def test_bad_arrays_are_clear_errors(tmp_path, x_train, x_test, y_train, match):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=np.zeros(len(x_test), int))
    with pytest.raises(SublabError, match=match):
        load_data(DataConfig(source="path", path=str(path)))


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    cases = [
        ["--set", "data.source=path", "--set", f"data.path={tmp_path / 'missing'}"],
        ["--set", "sweep={model.n_auxx: [1, 2]}"],
        ["--set", "sweep={model.n_aux: []}"],
        ["--set", "n_models=1"],
        ["--set", "sweep={model.n_aux: [1]}"],
    ]
    for extra in cases:
        rc = cli.main(["mnist", *extra, "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert rc == 2, extra
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert "did you mean 'model.n_aux'" in _error(["--set", "sweep={model.n_auxx: [1]}"], tmp_path, capsys)
    assert (
        "torchvision" in _error(["--set", "data.source=torchvision"], tmp_path, capsys) or _has_torchvision()
    )


def _error(extra, tmp_path, capsys) -> str:
    cli.main(["mnist", *extra, "--out", str(tmp_path / "run")])
    return capsys.readouterr().err


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ end to end


def test_end_to_end_on_sklearn_digits(tmp_path, monkeypatch):
    out = tmp_path / "run"
    overrides = [
        "data.source=sklearn-digits",
        "n_models=4",
        "model.hidden=24",
        "teacher.epochs=3",
        "teacher.lr=3e-3",
        "distill.epochs=1",
        "distill.batch_size=128",
        "distill.n_inputs=1500",
        "theorem.n_eval=64",
        "theorem.steps=2",
        "sweep={model.n_aux: [3, 2], distill.loss: [mse]}",
    ]
    run_dir = experiment.main(None, overrides, str(out))
    assert run_dir == out
    for name in ["config.yaml", "results.json", "report.md"]:
        assert (out / name).is_file(), name
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["n_models"] == 4 and cfg["data"]["source"] == "sklearn-digits" and cfg["threads"] == 1

    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "sublab.mnist.results" and res["schema_version"] == 1
    assert res["data"]["image_shape"] == [8, 8]
    # base + n_aux=2 + loss=mse (n_aux=3 is the base value)
    assert [s["label"] for s in res["settings"]] == ["base", "model.n_aux=2", "distill.loss=mse"]
    base = res["settings"][0]
    assert set(base["arms"]) == set(experiment.ARMS)
    for arm in base["arms"].values():
        assert arm["n"] == 4 and len(arm["values"]) == 4
        assert arm["ci95_low"] <= arm["mean"] <= arm["ci95_high"]
        assert all(0 <= v <= 1 for v in arm["values"])
    assert base["arms"]["teacher"]["mean"] > 0.6  # the teacher learned the digits
    assert base["arms"]["teacher"]["mean"] > base["arms"]["reference"]["mean"] + 0.3
    assert all(p != i for i, p in enumerate(base["pairing"]))
    # same-init - cross-init, paired by teacher slot: the mean of the slot differences
    pa = base["paired"]["student_aux - cross_aux"]
    diffs = [
        a - b
        for a, b in zip(
            base["arms"]["student_aux"]["values"], base["arms"]["cross_aux"]["values"], strict=True
        )
    ]
    assert pa["n"] == 4 and pa["unit"] == "teacher slot"
    assert pa["mean"] == pytest.approx(sum(diffs) / 4)
    assert "paired by teacher slot" in (out / "report.md").read_text()
    fs = base["theorem"]["first_step"]
    assert set(fs) == {"student_aux", "student_all", "cross_aux", "cross_all"}
    assert len(fs["student_aux"]["ip_sgd"]["values"]) == 4
    assert 0 <= fs["student_aux"]["ip_sgd"]["share_nonneg"] <= 1
    assert len(base["theorem"]["trajectory"]["cross_aux"]["cos"]) == 2
    # the loss sweep keeps the teacher (same model and teacher config); n_aux changes the architecture
    assert [s["teacher_reused"] for s in res["settings"]] == [False, False, True]
    assert res["settings"][2]["arms"]["teacher"] == base["arms"]["teacher"]
    assert base["steps"] == {"teacher": 3 * 23, "distill": 12}  # 1437 train images / 64; 1500 noise / 128

    report = (out / "report.md").read_text()
    assert "Student, aux only" in report and "Cross-init, aux only" in report and "Sweep" in report
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == [
        "accuracy.png",
        "inner_products.png",
        "sweep_distill_loss.png",
        "sweep_model_n_aux.png",
        "trajectory.png",
    ]
    for name in figures:
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{name}" in report

    # a rerun resumes: every finished setting is read back from settings/, none is recomputed
    def recompute(*args, **kwargs):
        raise AssertionError("a finished setting was recomputed")

    monkeypatch.setattr(experiment, "run_setting", recompute)
    experiment.main(None, overrides, str(out))
    assert json.loads((out / "results.json").read_text())["settings"] == res["settings"]
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert len(stages) == 3 and all(st["status"] == "done" for st in stages.values())


def test_grid_sweep_expands_every_combination():
    from sublab.config import validate
    from sublab.mnist.config import MnistConfig

    cfg = validate(
        MnistConfig, {"sweep": {"model.n_aux": [2, 3], "distill.loss": ["kl", "mse"]}, "sweep_mode": "grid"}
    )
    settings = experiment.expand_sweep(cfg)
    assert len(settings) == 4
    assert {(s["cfg"].model.n_aux, s["cfg"].distill.loss) for s in settings} == {
        (2, "kl"),
        (2, "mse"),
        (3, "kl"),
        (3, "mse"),
    }
    bad = validate(MnistConfig, {"sweep": {"distill.loss": ["hinge"]}})
    with pytest.raises(SublabError, match="distill.loss"):
        experiment.expand_sweep(bad)
    degenerate = validate(MnistConfig, {"sweep": {"model.n_aux": [1]}, "sweep_mode": "grid"})
    with pytest.raises(SublabError, match="n_aux >= 2 or distill.loss=mse"):
        experiment.expand_sweep(degenerate)

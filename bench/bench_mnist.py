"""Benchmark of the batched MNIST ensemble: achieved FLOP/s vs the machine's fp32 matmul peak, and the
speed-up over training the same models one by one in a Python loop.

    python bench/bench_mnist.py                       # the default config's distillation step, 1 thread
    python bench/bench_mnist.py --threads 2 --batch 1024 --models 25 --steps 5

The work is one distillation step of the experiment: N teachers' forward pass on their noise batches,
then forward, backward and Adam for the 4N students (aux-only, all-logit, and their cross-init twins).
FLOPs count the matmuls only (2 per multiply-add): forward, weight gradients, and input gradients of
every layer but the first. The loop baseline does exactly the same arithmetic with one ordinary
nn.Sequential MLP and one Adam per model. On a machine shared with other jobs the numbers are noisy.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from sublab.mnist.ensemble import Ensemble
from sublab.mnist.train import FUSED, LogitGroup, NoiseInputs, distill


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best-of-N fp32 GFLOP/s of one square torch.mm."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def step_flops(sizes: list[int], n_teachers: int, n_students: int, batch: int) -> float:
    macs = sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    macs_no_first = macs - sizes[0] * sizes[1]
    student = 2 * batch * (macs + macs + macs_no_first)  # forward, weight grads, input grads (not layer 1)
    teacher = 2 * batch * macs
    return n_students * student + n_teachers * teacher


def groups_for(n: int, m: int) -> list[LogitGroup]:
    aux, every = tuple(range(10, 10 + m)), tuple(range(10 + m))
    return [
        LogitGroup("student_aux", 0, n, aux),
        LogitGroup("student_all", n, 2 * n, every),
        LogitGroup("cross_aux", 2 * n, 3 * n, aux),
        LogitGroup("cross_all", 3 * n, 4 * n, every),
    ]


def bench_ensemble(sizes: list[int], n: int, batch: int, steps: int) -> float:
    g = torch.Generator().manual_seed(0)
    ref = Ensemble.init(n, sizes, g)
    teacher = ref.clone()
    cross = ref.select(torch.roll(torch.arange(n), 1))
    students = Ensemble.concat([ref, ref, cross, cross]).clone()
    teacher_of = torch.arange(n).repeat(4)
    inputs = NoiseInputs(n, sizes[0], batch * (steps + 1), batch, 0, False, torch.device("cpu"))
    groups = groups_for(n, sizes[-1] - 10)
    distill(students, teacher, teacher_of, groups, inputs, 1, 3e-4)  # warm-up
    t = time.perf_counter()
    distill(students, teacher, teacher_of, groups, inputs, steps, 3e-4)
    return (time.perf_counter() - t) / steps


def _mlp(sizes: list[int], ens: Ensemble, i: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (w, b) in enumerate(zip(ens.weights, ens.biases, strict=True)):
        lin = nn.Linear(w.shape[1], w.shape[2])
        with torch.no_grad():
            lin.weight.copy_(w[i].T)
            lin.bias.copy_(b[i, 0])
        layers.append(lin)
        if k < len(ens.weights) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def bench_loop(sizes: list[int], n: int, batch: int, steps: int) -> float:
    """The same step, one model at a time: what you would write without the batched ensemble."""
    ref = Ensemble.init(n, sizes, torch.Generator().manual_seed(0))
    teachers = [_mlp(sizes, ref, i).requires_grad_(False) for i in range(n)]
    students = [_mlp(sizes, ref, i % n) for i in range(4 * n)]
    opts = [torch.optim.Adam(s.parameters(), lr=3e-4, fused=FUSED) for s in students]
    m = sizes[-1] - 10
    logit_sets = [slice(10, 10 + m), slice(0, 10 + m)]

    def one_step() -> None:
        xs = [torch.rand(batch, sizes[0]) * 2 - 1 for _ in range(n)]
        with torch.no_grad():
            targets = [t(x) for t, x in zip(teachers, xs, strict=True)]
        for j, (s, opt) in enumerate(zip(students, opts, strict=True)):
            slot, sel = j % n, logit_sets[(j // n) % 2]
            out = s(xs[slot])[:, sel]
            log_p_t = F.log_softmax(targets[slot][:, sel], -1)
            loss = (log_p_t.exp() * (log_p_t - F.log_softmax(out, -1))).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    one_step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        one_step()
    return (time.perf_counter() - t) / steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=25, help="ensemble size N (students: 4N)")
    p.add_argument("--batch", type=int, default=256, help="inputs per step and model")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inputs", type=int, default=784)
    p.add_argument("--n-aux", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [args.inputs, args.hidden, args.hidden, 10 + args.n_aux]

    peak = matmul_peak()
    flops = step_flops(sizes, args.models, 4 * args.models, args.batch)
    t_ens = bench_ensemble(sizes, args.models, args.batch, args.steps)
    t_loop = bench_loop(sizes, args.models, args.batch, args.steps)
    ens_gf, loop_gf = flops / t_ens / 1e9, flops / t_loop / 1e9
    print(f"threads {args.threads}; MLP {'-'.join(map(str, sizes))}; {args.models} teachers + {4 * args.models} "
          f"students; batch {args.batch}; {flops / 1e9:.1f} GFLOP per distillation step")  # fmt: skip
    print(f"fp32 matmul peak (torch.mm 2048^2, best of 5): {peak:8.1f} GFLOP/s")
    print(
        f"batched ensemble:  {t_ens * 1e3:8.1f} ms/step  {ens_gf:8.1f} GFLOP/s  ({ens_gf / peak:.0%} of peak)"
    )
    print(
        f"per-model loop:    {t_loop * 1e3:8.1f} ms/step  {loop_gf:8.1f} GFLOP/s  ({loop_gf / peak:.0%} of peak)"
    )
    print(f"speed-up of the ensemble over the loop: {t_loop / t_ens:.2f}x")


if __name__ == "__main__":
    main()

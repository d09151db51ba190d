"""N independent MLPs stored as one weight tensor per layer with a leading ensemble dimension.

    ens = Ensemble.init(n_models=25, sizes=[784, 256, 256, 13], generator=g)
    logits = ens(x)                  # x: (N, batch, 784) -> (N, batch, 13), one torch.baddbmm per layer

Every layer of every model runs in one batched matrix multiply, so training N models costs a handful
of large kernel calls per step instead of N Python iterations. Members never interact: a loss that is a
sum of per-member losses gives each member exactly the gradient it would get alone, and Adam is
elementwise, so the ensemble trains each member exactly as a separate model would be trained.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Ensemble:
    """weights[l]: (N, fan_in, fan_out); biases[l]: (N, 1, fan_out). ReLU between layers, none at the end."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]

    @classmethod
    def init(
        cls,
        n_models: int,
        sizes: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Ensemble:
        """Weights ~ N(0, std = 1/sqrt(fan_in)) (the paper's init), zero biases."""
        weights, biases = [], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            w = torch.randn(n_models, fan_in, fan_out, generator=generator) / math.sqrt(fan_in)
            weights.append(w.to(device))
            biases.append(torch.zeros(n_models, 1, fan_out, device=device))
        return cls(weights, biases)

    # -------------------------------------------------------------- shape

    @property
    def n_models(self) -> int:
        return int(self.weights[0].shape[0])

    @property
    def sizes(self) -> list[int]:
        return [int(self.weights[0].shape[1])] + [int(w.shape[2]) for w in self.weights]

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    def parameters(self) -> list[torch.Tensor]:
        return [p for pair in zip(self.weights, self.biases, strict=True) for p in pair]

    def n_params_per_model(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    # -------------------------------------------------------------- compute

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, batch, fan_in) -> logits (N, batch, n_out).

        x may also be (G, batch, fan_in) with N = R * G: member j then reads x[j % G]. That serves R groups
        of members sharing inputs (the four student arms of one teacher slot) without copying x R times;
        the first layer is then R batched multiplies (one per group), never one per member.
        """
        n, g = self.n_models, x.shape[0]
        w, b = self.weights[0], self.biases[0]
        if g == n:
            h = torch.baddbmm(b, x, w)
        elif n % g == 0:
            h = SharedInputLinear.apply(x, w, b)
        else:
            raise ValueError(f"inputs for {g} members do not divide an ensemble of {n}")
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            h = torch.baddbmm(b, torch.relu_(h), w)
        return h

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """The same inputs for every member: x (batch, fan_in) -> (N, batch, n_out)."""
        return self(x.unsqueeze(0).expand(self.n_models, -1, -1))

    # -------------------------------------------------------------- copies

    def clone(self, requires_grad: bool = False) -> Ensemble:
        return Ensemble(
            [w.detach().clone().requires_grad_(requires_grad) for w in self.weights],
            [b.detach().clone().requires_grad_(requires_grad) for b in self.biases],
        )

    def select(self, index: torch.Tensor | Sequence[int]) -> Ensemble:
        """A new ensemble of the given members (in that order, repeats allowed), detached copies."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return Ensemble(
            [w.detach()[idx].clone() for w in self.weights], [b.detach()[idx].clone() for b in self.biases]
        )

    @staticmethod
    def concat(parts: Sequence[Ensemble]) -> Ensemble:
        n_layers = len(parts[0].weights)
        return Ensemble(
            [torch.cat([p.weights[i].detach() for p in parts]) for i in range(n_layers)],
            [torch.cat([p.biases[i].detach() for p in parts]) for i in range(n_layers)],
        )

    def flat(self) -> torch.Tensor:
        """All parameters of each member as one row: (N, params_per_model)."""
        return torch.cat([p.detach().reshape(self.n_models, -1) for p in self.parameters()], dim=1)

    def with_flat(self, flat: torch.Tensor) -> Ensemble:
        """An ensemble of the same shape whose parameters are the rows of flat (N, params_per_model)."""
        out_w, out_b, at = [], [], 0
        for w, b in zip(self.weights, self.biases, strict=True):
            for src, dst in ((w, out_w), (b, out_b)):
                size = src[0].numel()
                dst.append(flat[:, at : at + size].reshape(src.shape))
                at += size
        return Ensemble(out_w, out_b)


class SharedInputLinear(torch.autograd.Function):
    """y[j] = x[j % G] @ w[j] + b[j] for N = R * G members, written block by block into one output.

    Autograd through slices of w would allocate and zero-fill a full-size gradient of w for every block;
    this computes each block's weight gradient straight into its slice of one gradient tensor.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        g, n = x.shape[0], w.shape[0]
        out = torch.empty(n, x.shape[1], w.shape[2], dtype=w.dtype, device=w.device)
        for r in range(0, n, g):  # R blocks (e.g. 4 student arms), each one batched multiply
            torch.baddbmm(b[r : r + g], x, w[r : r + g], out=out[r : r + g])
        ctx.save_for_backward(x, w)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        g, n = x.shape[0], w.shape[0]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x)
            for r in range(0, n, g):
                grad_x.baddbmm_(grad[r : r + g], w[r : r + g].transpose(1, 2))
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(w)
            xt = x.transpose(1, 2)
            for r in range(0, n, g):
                torch.bmm(xt, grad[r : r + g], out=grad_w[r : r + g])
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(1, keepdim=True)
        return grad_x, grad_w, grad_b


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation p of 0..n-1 with p[i] != i for every i (n >= 2), by rejection sampling.

    Used to give each cross-init student the init of ANOTHER member's reference model.
    """
    if n < 2:
        raise ValueError("a derangement needs at least 2 elements")
    while True:  # P(accept) -> 1/e, so a handful of draws on average
        p = torch.randperm(n, generator=generator)
        if not (p == torch.arange(n)).any():
            return p

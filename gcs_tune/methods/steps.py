"""Step rules: how one optimisation step turns a loss closure into a parameter update.

A closure recomputes the loss on the current mini-batch and calls ``backward()``; the rule zeroes
the gradients before each call. SGD calls it once. SAM calls it twice (at θ and at θ + ε) and
steps with the sharpness gradient; GCSAM differs from SAM only in :meth:`combine`, which picks the
update direction from the two gradients. The base optimiser (SGD, momentum, weight decay) then
takes its step from ``p.grad``.

The interface the engine calls: ``step(closure) -> loss``, ``end_epoch(epoch)`` after every epoch,
``pop_stats()``, ``pilot_epochs`` / ``after_pilot(pilot)`` for a rule that needs a first pass
of the same run (SubPT, :mod:`gcs_tune.methods.subspace`), and ``state_dict()`` /
``load_state_dict(state)`` for what a rule carries from one epoch to the next (a resumed run).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

Closure = Callable[[], torch.Tensor]
Grads = list[torch.Tensor]


def _flat(tensors: Grads) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class SGDStep:
    """One gradient evaluation, one base-optimiser step (CoOp)."""

    two_pass = False  # the SAM family compares two gradients: the engine may keep them in fp32
    pilot_epochs = 0  # epochs of a first pass of the run whose end_epoch calls this rule sees

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer):
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = optimizer

    def _gradient(self, closure: Closure) -> tuple[torch.Tensor, Grads]:
        self.optimizer.zero_grad(set_to_none=False)
        loss = closure()
        return loss, [p.grad.detach().clone() for p in self.params]

    def step(self, closure: Closure) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=False)
        loss = closure()
        self.optimizer.step()
        return loss

    def end_epoch(self, epoch: int) -> None:
        """Called by the engine after every epoch (0-based), of the pilot pass too."""

    def after_pilot(self, pilot: "SGDStep") -> None:
        """Receive what the pilot pass's rule learnt (the run was rebuilt from its seed since)."""

    def pop_stats(self) -> dict[str, float]:
        """Per-epoch diagnostics, reset on read. Called by the engine at the end of each epoch."""
        return {}

    def state_dict(self) -> dict:
        """What the rule carries into the next epoch. SGD and the SAM family carry nothing: the
        momentum is the base optimiser's, and GCSAM's counters are per epoch (``pop_stats`` has
        reset them when the engine takes the state)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (the run was rebuilt from its seed since)."""


class SAMStep(SGDStep):
    """Sharpness-aware minimisation: ε = ρ g/‖g‖, g_s = ∇L(θ + ε), restore θ, step with g_s."""

    two_pass = True

    def __init__(self, params, optimizer, rho: float):
        super().__init__(params, optimizer)
        self.rho = rho

    def step(self, closure: Closure) -> torch.Tensor:
        loss, g = self._gradient(closure)
        saved = [p.detach().clone() for p in self.params]  # restore by copy: (θ+ε)−ε ≠ θ in floats
        scale = self.rho / (_flat(g).norm() + 1e-12)  # the norm over all trainable tensors together
        with torch.no_grad():
            for p, gi in zip(self.params, g):
                p.add_(gi * scale)
        _, g_s = self._gradient(closure)
        with torch.no_grad():
            for p, s in zip(self.params, saved):
                p.copy_(s)
            for p, d in zip(self.params, self.combine(g, g_s)):
                p.grad.copy_(d)
        self.optimizer.step()
        return loss

    def combine(self, g: Grads, g_s: Grads) -> Grads:
        """The update direction from the loss gradient g and the sharpness gradient g_s."""
        return g_s


class GCSAMStep(SAMStep):
    """Gradient-constrained SAM (GCSCoOp). With c = cos(g_s, g):
    c ≤ β1 → g (conflict: follow the loss value); β1 < c < β2 → ⟨g_s,u⟩u, u = (g_s+g)/‖g_s+g‖;
    c ≥ β2 → g_s. When β1 ≤ 0 there is no fallback to g: the projection covers every c < β2.

    ``cos_scope="per_tensor"`` (the authors' code) decides the case for each parameter tensor on
    its own gradients; ``"global"`` decides once on all tensors joined. The perturbation ε of the
    first pass is the same either way (its norm is over all tensors, as SAM's)."""

    CASES = ("g", "proj", "gs")

    def __init__(self, params, optimizer, rho: float, beta1: float, beta2: float, cos_scope: str = "per_tensor"):
        super().__init__(params, optimizer, rho)
        self.beta1, self.beta2, self.cos_scope = beta1, beta2, cos_scope
        self._reset()

    def _reset(self) -> None:
        self.counts = dict.fromkeys(self.CASES, 0)  # decisions: one per step, or per tensor per step
        self.cos_sum = 0.0

    def choose(self, cos: float) -> str:
        if self.beta1 > 0 and cos <= self.beta1:
            return "g"
        return "gs" if cos >= self.beta2 else "proj"

    def combine(self, g: Grads, g_s: Grads) -> Grads:
        if self.cos_scope == "global":
            return _split_like(self.direction(_flat(g), _flat(g_s)), g)
        return [self.direction(gi.reshape(-1), si.reshape(-1)).view_as(gi) for gi, si in zip(g, g_s)]

    def direction(self, g: torch.Tensor, g_s: torch.Tensor) -> torch.Tensor:
        """The update direction from two flat gradients; counts the case it took."""
        cos = float(torch.nn.functional.cosine_similarity(g_s, g, dim=0, eps=1e-12))
        case = self.choose(cos)
        self.counts[case] += 1
        self.cos_sum += cos
        if case == "g":
            return g
        if case == "gs":
            return g_s
        merged = g_s + g
        u = merged / (merged.norm() + 1e-12)
        return torch.dot(g_s, u) * u  # ⟨g_s, u⟩ u

    def pop_stats(self) -> dict[str, float]:
        n = sum(self.counts.values())
        stats = {f"frac_{c}": self.counts[c] / n for c in self.CASES} if n else {}
        if n:
            stats["mean_cos"] = self.cos_sum / n
        self._reset()
        return stats


def _split_like(flat: torch.Tensor, like: Grads) -> Grads:
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out

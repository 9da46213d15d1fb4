"""SubPT: every gradient projected onto the subspace the prompt moved in early in training.

Phase A (the pilot pass): train as the inner rule does and keep the trainable tensors, joined into
one vector, after each of the first ``t_early`` epochs. Their centred PCA gives U (r × D), the top
r principal directions. Phase B: the run is rebuilt from the same seed and every gradient becomes
Uᵀ(U g) before the inner rule's base optimiser steps (its weight decay is added after the
projection, as in the authors' code, so with weight decay the update leaves span(U) by −lr·wd·θ).

The rule wraps any other rule (SGD for SubPT as published, GCSAM, ...) by handing it a projecting
optimiser: whatever direction the inner rule leaves in ``p.grad`` is projected at the base step.
(The authors' scripts name a restart checkpoint, ``DIRECT_RESUME``, that their code never reads:
phase B starts from the seed's initial context, as here.)
"""
from __future__ import annotations

from typing import Callable

import torch

from gcs_tune.methods.steps import Closure, SGDStep


def principal_directions(snapshots: torch.Tensor, rank: int) -> torch.Tensor:
    """(t, D) snapshots -> (rank, D) orthonormal rows: the top principal axes of the centred
    snapshots (sklearn's PCA ``components_`` up to sign, which the projection UᵀU ignores)."""
    if not 1 <= rank <= min(snapshots.shape):
        raise ValueError(f"subspace rank {rank} must be between 1 and min(snapshots, dim) = {min(snapshots.shape)}")
    w = snapshots.double()
    _, _, vh = torch.linalg.svd(w - w.mean(dim=0, keepdim=True), full_matrices=False)
    return vh[:rank].to(snapshots.dtype)


class ProjectedOptimizer:
    """The base optimiser with ``g ← Uᵀ(U g)`` applied to the joined gradient of ``params`` before
    each step. ``basis`` None: no projection (the pilot pass). Everything else is delegated."""

    def __init__(self, base: torch.optim.Optimizer, params: list[torch.nn.Parameter]):
        self.base, self.params = base, params
        self.basis: torch.Tensor | None = None  # (r, D)

    def step(self) -> None:
        if self.basis is not None:
            with torch.no_grad():
                g = torch.cat([p.grad.reshape(-1) for p in self.params])  # (D,)
                g = self.basis.t() @ (self.basis @ g.to(self.basis.dtype))
                start = 0
                for p in self.params:
                    p.grad.copy_(g[start:start + p.numel()].view_as(p))
                    start += p.numel()
        self.base.step()

    def __getattr__(self, name: str):  # zero_grad, param_groups, state_dict, ...
        return getattr(self.base, name)


class SubspaceStep:
    """SubPT around ``inner`` (a step rule built on the projecting optimiser)."""

    def __init__(self, inner: Callable[[list, ProjectedOptimizer], SGDStep], params, optimizer,
                 rank: int, t_early: int):
        params = [p for p in params if p.requires_grad]
        self.projected = ProjectedOptimizer(optimizer, params)
        self.inner = inner(params, self.projected)
        self.params, self.rank = params, rank
        self.two_pass = self.inner.two_pass
        self.pilot_epochs = t_early
        self.snapshots: list[torch.Tensor] = []

    def step(self, closure: Closure) -> torch.Tensor:
        return self.inner.step(closure)

    def end_epoch(self, epoch: int) -> None:
        if self.projected.basis is None and epoch < self.pilot_epochs:
            self.snapshots.append(torch.cat([p.detach().reshape(-1) for p in self.params]).clone())
        self.inner.end_epoch(epoch)

    def basis(self) -> torch.Tensor:
        """U from the snapshots of the first ``t_early`` epochs."""
        return principal_directions(torch.stack(self.snapshots), self.rank)

    def after_pilot(self, pilot: "SubspaceStep") -> None:
        self.projected.basis = pilot.basis().to(self.params[0].device)

    def state_dict(self) -> dict:
        """U (the pilot pass is not run again on resume) and the inner rule's state. The
        snapshots are phase A's only: phase B never adds to them."""
        return {"basis": self.projected.basis, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        basis = state["basis"]  # (r, D) or None
        self.projected.basis = None if basis is None else basis.to(self.params[0].device)
        self.inner.load_state_dict(state["inner"])

    def pop_stats(self) -> dict[str, float]:
        return self.inner.pop_stats()

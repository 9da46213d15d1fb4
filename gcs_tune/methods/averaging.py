"""The "averaging" column of the methods table: which prompt a run evaluates and exports.

``none``: the current prompt. ``gaussian``: PromptSRC's Gaussian prompt aggregation -- after each
epoch e (1..E) the trainable tensors are added with weight w_e ∝ N(e; μ, σ), normalised over the E
epochs, and the aggregate is what is evaluated. Before the last epoch the running sum is divided
by the weights seen so far (what the aggregate would be had training stopped there); at the last
epoch that sum is 1 and the result is the authors' aggregate.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
from torch import nn


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


class NoAveraging:
    def update(self, epoch: int, module: nn.Module) -> None:
        """Called after every epoch (0-based) with the prompter."""

    def applied(self, module: nn.Module):
        """A context in which ``module`` holds the prompt to evaluate."""
        return nullcontext()

    def state_dict(self) -> dict:
        """What the average carries into the next epoch (a resumed run)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`."""


def gaussian_weights(epochs: int, mean: float, std: float) -> list[float]:
    """w_e ∝ N(e; mean, std) for e = 1..epochs, normalised to sum 1 (float64)."""
    pdf = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    total = sum(pdf)
    if total == 0.0:
        raise ValueError(f"Gaussian prompt aggregation: every weight underflows (mean {mean}, std {std}, "
                         f"{epochs} epochs); put method.gpa_mean inside the run")
    return [w / total for w in pdf]


class GaussianAverage(NoAveraging):
    def __init__(self, epochs: int, mean: float, std: float):
        self.weights = gaussian_weights(epochs, mean, std)
        self.sums: dict[str, torch.Tensor] = {}  # float64 running Σ w_e θ_e
        self.total = 0.0

    def update(self, epoch: int, module: nn.Module) -> None:
        w = self.weights[epoch]
        for name, p in trainable(module).items():
            term = p.detach().double() * w
            # .to: a resumed run's sums were read back on the CPU (a no-op otherwise)
            self.sums[name] = self.sums[name].to(term.device) + term if name in self.sums else term
        self.total += w

    def state_dict(self) -> dict:
        """The running sums and the weight they hold; the weights come again from the config."""
        return {"sums": dict(self.sums), "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.total = dict(state["sums"]), float(state["total"])

    def averaged(self) -> dict[str, torch.Tensor]:
        """Σ w_e θ_e / Σ w_e over the epochs so far (empty before the first epoch, or while every
        weight so far underflowed to 0: then the current prompt is evaluated)."""
        if self.total == 0.0:
            return {}
        return {name: s / self.total for name, s in self.sums.items()}

    @contextmanager
    def applied(self, module: nn.Module):
        params, average = trainable(module), self.averaged()
        saved = {name: params[name].detach().clone() for name in average}
        with torch.no_grad():
            for name, value in average.items():
                params[name].copy_(value.to(params[name].dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

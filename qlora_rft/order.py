"""Which training rows each optimizer step takes, and how many steps a run has: pure functions of the row count,
the prompts per step and the seed, so a resumed run continues exactly without saving any iterator state.

The prompts of a run form one stream, epoch after epoch, each epoch a seeded permutation of the rows; step s takes
the stream's positions (s-1)*P .. s*P-1 (P: prompts per step over all processes). A step may cross an epoch's end.
"""

from __future__ import annotations

import math

import torch


def training_steps(max_steps: int, epochs: int, rows: int, per_step: int) -> int:
    """The run's optimizer steps: `max_steps`, or with `epochs` > 0 enough steps for that many passes over `rows`,
    the last step filled from the next epoch's start: ceil(epochs * rows / per_step).

    >>> training_steps(0, 2, rows=10, per_step=4), training_steps(0, 1, rows=10, per_step=4)
    (5, 3)
    """
    return math.ceil(epochs * rows / per_step) if epochs > 0 else max_steps


def epochs_done(step: int, rows: int, per_step: int) -> float:
    """Passes over the rows completed once `step` steps have run (what metrics.jsonl logs as `epoch`).

    >>> epochs_done(3, rows=10, per_step=4)
    1.2
    """
    return step * per_step / rows


class PromptOrder:
    """Which row the n-th prompt of the run is. Epoch e is the permutation of the rows seeded with seed + e, except
    at a step that crosses from epoch e-1 into e: the rows that step already took from epoch e-1 are moved to the
    end of epoch e's permutation. So every row comes exactly once per epoch and no step holds a row twice (given
    per_step <= size). Position n alone decides the row: a resumed run continues exactly. Another `stream` is an
    unrelated order of the same rows and seed (dynamic sampling's fresh prompts)."""

    def __init__(self, size: int, seed: int, per_step: int = 1, stream: int = 0):
        self.size, self.seed, self.per_step, self.stream = size, seed, per_step, stream
        self._epoch, self._perm = -1, []

    def index(self, n: int) -> int:
        epoch, pos = divmod(n, self.size)
        return self._permutation(epoch)[pos]

    def _permutation(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s order, built forward from epoch 0 (each epoch's depends on the end of the one before)."""
        if epoch < self._epoch:
            self._epoch, self._perm = -1, []
        while self._epoch < epoch:
            e = self._epoch + 1
            generator = torch.Generator().manual_seed(self.seed + e + (self.stream << 32))
            perm = torch.randperm(self.size, generator=generator).tolist()
            shared = (e * self.size) % self.per_step  # epoch e-1's last positions in the step crossing into e
            taken = set(self._perm[self.size - shared:]) if shared else set()
            self._perm = [r for r in perm if r not in taken] + [r for r in perm if r in taken]
            self._epoch = e
        return self._perm

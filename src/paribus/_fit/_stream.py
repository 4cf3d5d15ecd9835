"""Minibatches streamed from an iterator, a chunk of the loop at a time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class Stream:
    """Minibatches from an iterator, stacked ``size`` at a time as the loop asks for them.

    One batch is read ahead, so the chunk that holds the iterator's last batch ends the run
    there (as ``max_steps`` would): at most one chunk's batches are drawn beyond those used.
    """

    def __init__(self, batches: Iterator, size: int):
        self.batches, self.size = batches, size
        self.ahead = [self._next()]
        if self.ahead[0] is None:
            raise ValueError("pb.fit: the batch iterator gave no batches.")
        first = self.ahead[0]
        self.signature = jax.tree.structure(first), [np.shape(a) for a in jax.tree.leaves(first)]
        self.drawn = 1

    def _next(self):
        try:
            return next(self.batches)
        except StopIteration:
            return None

    def first(self) -> PyTree:
        return self.ahead[0]

    def chunk(self, k: int, limit: int) -> tuple[PyTree, int]:
        """The stacked batches for theta_k, theta_(k+1), ... and the chunk's step limit."""
        want = min(self.size, limit - k + 1)
        items = self.ahead
        while len(items) < want + 1:
            item = self._next()
            if item is None:
                break
            self._check(item, self.drawn)
            self.drawn += 1
            items.append(item)
        used, self.ahead = items[:want], items[want:]
        if not self.ahead:  # the iterator ran out: the last batch ends the run
            limit = min(limit, k + len(used) - 1)
        used = used + [used[-1]] * (self.size - len(used))
        stack = (
            np.stack if all(isinstance(a, np.ndarray) for a in jax.tree.leaves(used)) else jnp.stack
        )
        return jax.tree.map(lambda *a: stack(a), *used), limit

    def _check(self, item, i: int) -> None:
        this = jax.tree.structure(item), [np.shape(a) for a in jax.tree.leaves(item)]
        if this != self.signature:
            raise ValueError(
                f"pb.fit: batch {i} from the iterator has structure/shapes {this}; batch 0 had "
                f"{self.signature}. Every minibatch must have the same structure and shapes."
            )

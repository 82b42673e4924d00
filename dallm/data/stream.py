"""The training order: a seed mixer, one deterministic (index, augmentation seed) stream per run, its loader.

The stream is indexed by the sample position since the start of the run (`StepSampler`), so a run
resumed at step k sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(seed: int, value: int) -> int:
    """A well-spread non-negative 63-bit seed from (seed, value).

    Hashing instead of `seed + value` keeps runs with neighbouring seeds from replaying each
    other's shuffles shifted by one epoch, which would make a seed sweep less informative.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (value & _MASK64)) >> 1


class StepSampler(Sampler[tuple[int, int]]):
    """The whole run's training order as one deterministic stream, sharded over ranks.

    Stream position p (0, 1, 2, ...) is index `perm_e[p % n]` of epoch `e = p // n`, where `perm_e` is
    `torch.randperm(n)` seeded with `mix_seed(seed, e)`, and carries the augmentation seed
    `mix_seed(seed, -1 - p)`. Per-rank batch q of rank r holds positions
    `(q * world_size + r) * batch_size + j`, j < batch_size, so ranks get disjoint shards, and gradient
    accumulation only means more per-rank batches per optimizer step. The sampler yields
    `(index, aug_seed)` for per-rank batches `[start_batch, total_batches)`: resuming at batch k yields
    exactly the tail of the uninterrupted stream.

    `len()` counts the whole run, `total_batches * batch_size`, not just what is left. Lightning
    restores its in-epoch batch counter on resume and ends the epoch when that counter reaches the
    loader's length; with a length of only the remaining batches, a run resumed mid-way would end its
    epoch early (stepping the optimizer on a partial accumulation) and then replay the tail.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start_batch: int,
        total_batches: int,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if n < 1:
            raise ValueError(f"StepSampler needs n >= 1 items, got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start_batch < 0 or total_batches < 0:
            raise ValueError(f"need start_batch, total_batches >= 0, got {start_batch}, {total_batches}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_batch, self.total_batches = start_batch, total_batches
        self.world_size, self.rank = world_size, rank

    def position(self, batch: int, j: int) -> int:
        """Stream position of item j of this rank's per-rank batch `batch`."""
        return (batch * self.world_size + self.rank) * self.batch_size + j

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of epoch `epoch` of the stream."""
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))

    def item(self, position: int) -> tuple[int, int]:
        """(index, aug_seed) at a stream position; a pure function of (n, seed, position)."""
        return int(self.permutation(position // self.n)[position % self.n]), mix_seed(
            self.seed, -1 - position
        )

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, perm = -1, None
        for q in range(self.start_batch, self.total_batches):
            for j in range(self.batch_size):
                p = self.position(q, j)
                if p // self.n != epoch:  # positions only grow: one randperm per epoch
                    epoch = p // self.n
                    perm = self.permutation(epoch)
                yield int(perm[p % self.n]), mix_seed(self.seed, -1 - p)

    def __len__(self) -> int:
        return self.total_batches * self.batch_size


class StepDataLoader(DataLoader):
    """A DataLoader over a `StepSampler` that Lightning treats as resumable.

    The position to resume from needs no saving: it follows from the restored `global_step`. The
    state only records what the stream depends on, so a resume with other data or settings warns
    instead of silently training on a different stream (and Lightning drops its generic
    "dataloader is not resumable" warning).
    """

    def state_dict(self) -> dict[str, int]:
        s = self.sampler
        assert isinstance(s, StepSampler)
        return {"n": s.n, "batch_size": s.batch_size, "seed": s.seed, "world_size": s.world_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        now = self.state_dict()
        changed = {
            k: f"{state_dict[k]} -> {v}" for k, v in now.items() if k in state_dict and state_dict[k] != v
        }
        if changed:
            warnings.warn(
                f"resuming with a different training stream ({changed}; n is the training-set size): the "
                "batches from here on are not those the interrupted run would have seen",
                stacklevel=2,
            )

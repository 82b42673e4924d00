"""Tests of dallm.data.stream: the run's training order as a pure function of (seed, position, rank)."""

from __future__ import annotations

from dallm.data.stream import StepSampler


def test_step_sampler_deterministic_and_resume_is_tail():
    full = list(StepSampler(7, 3, seed=5, start_batch=0, total_batches=10))
    assert full == list(StepSampler(7, 3, seed=5, start_batch=0, total_batches=10))
    assert full != list(StepSampler(7, 3, seed=6, start_batch=0, total_batches=10))
    for k in (1, 4, 9):
        assert list(StepSampler(7, 3, seed=5, start_batch=k, total_batches=10)) == full[k * 3 :]
    assert len({aug for _, aug in full}) == len(full)  # every position gets its own augmentation


def test_step_sampler_epochs_cover_every_index_once():
    n = 7
    stream = [i for i, _ in StepSampler(n, 1, seed=0, start_batch=0, total_batches=4 * n)]
    epochs = [stream[e * n : (e + 1) * n] for e in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch


def test_step_sampler_ranks_are_disjoint_shards_of_the_stream():
    n, b, batches = 10, 2, 6
    single = list(StepSampler(n, b, seed=1, start_batch=0, total_batches=2 * batches))
    ranks = [
        StepSampler(n, b, seed=1, start_batch=0, total_batches=batches, world_size=2, rank=r) for r in (0, 1)
    ]
    positions = [[s.position(q, j) for q in range(batches) for j in range(b)] for s in ranks]
    assert not set(positions[0]) & set(positions[1])
    assert sorted(positions[0] + positions[1]) == list(range(2 * batches * b))
    # Interleaving the ranks' batches reproduces the single-process stream item for item.
    per_rank = [list(s) for s in ranks]
    merged = [x for q in range(batches) for r in (0, 1) for x in per_rank[r][q * b : (q + 1) * b]]
    assert merged == single


def test_step_sampler_len_counts_the_whole_run():
    # Lightning restores its in-epoch batch counter on resume; the length must match that count.
    assert len(StepSampler(5, 3, seed=0, start_batch=4, total_batches=10)) == 30
    assert len(list(StepSampler(5, 3, seed=0, start_batch=4, total_batches=10))) == 18

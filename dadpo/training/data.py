"""Which rows each optimizer step trains on, decided by the seed and the global batch alone.

    split_eval         hold out rows by a hash of their id (stable across runs, seeds, shard layouts)
    global_batch_rows  step s's rows: a seeded permutation per epoch, cut into global batches
                       (an epoch's incomplete tail is skipped)
    process_rows       process p's contiguous share of them, cut into grad_accum micro-batches

So 2 processes x grad_accum 1 train on exactly the rows of 1 process x grad_accum 2, and a resumed run
on exactly the rows of an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import polars as pl
import torch


def split_eval(rows: pl.DataFrame, eval_fraction: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Hold out rows by a hash of their `id`: stable across runs, seeds and shard layouts."""
    bucket = [int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for row_id in rows["id"]]
    is_eval = pl.Series(bucket, dtype=pl.Float64) < eval_fraction
    return rows.filter(~is_eval), rows.filter(is_eval)


def global_batch_rows(rows: pl.DataFrame, step: int, global_batch: int, steps_per_epoch: int, seed: int) -> pl.DataFrame:
    """The rows of optimizer step `step` (0-based)."""
    epoch, index = divmod(step, steps_per_epoch)
    take = _epoch_order(rows.height, seed, epoch)[index * global_batch : (index + 1) * global_batch]
    return rows[take.tolist()]


@functools.lru_cache(maxsize=2)
def _epoch_order(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    # computed once per epoch, not once per step (a million-row permutation costs milliseconds)
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def process_rows(global_rows: pl.DataFrame, process_index: int, batch_size: int, grad_accum: int) -> list[pl.DataFrame]:
    """This process's micro-batches of a step's global batch."""
    mine = global_rows.slice(process_index * batch_size * grad_accum, batch_size * grad_accum)
    return [mine.slice(i * batch_size, batch_size) for i in range(grad_accum)]


def prefetched(make: Callable[[int], object], steps: range) -> Iterator[tuple[int, object]]:
    """(step, make(step)) for each step, make(step + 1) running in a background thread meanwhile, so
    reading rows and building tensors stays off the training step's critical path."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(make, steps.start) if len(steps) else None
        for step in steps:
            ready = upcoming.result()
            if step + 1 < steps.stop:
                upcoming = pool.submit(make, step + 1)
            yield step, ready

"""Which queries and demonstrations a trial uses: the reference's random draws, made independent of the ranks.

Reference (open_flamingo/eval/evaluate.py + utils.py, one rank), for a trial seed s:
1. `np.random.seed(s)`; eval samples = `np.random.choice(len(test), num_samples, replace=False)`;
2. their order = a `DistributedSampler` (shuffle, seed 0, epoch 0) over them: `torch.randperm(n)` from a
   generator seeded 0;
3. query set = `np.random.choice(len(train), query_set_size, replace=False)` (the same numpy stream);
4. `random.seed(s + rank)`; per query, in order: `random.sample(query_set, effective_num_shots)`.
Classification with prompt ensembling draws per batch: the batch's samples, then P rounds of `random.shuffle` of
every query's demo list (P = min(6, k!)), each round one prompt order; the shuffles advance the same stream, so
the next batch's draws depend on them. With RICES the demos are retrieved per batch (most similar last) and the
query set is never drawn; the shuffles still come from the seeded stream.
Under DDP the reference gives each rank its own shard and its own demo stream, so its scores depend on the
world size. Here every rank draws the whole plan exactly as one reference rank does (cheap: indices only), then
takes its share of the queries, so any world size evaluates the same query-demo pairs as the reference on one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flamingo_composer.eval.prompts import effective_num_shots


@dataclass(frozen=True)
class TrialPlan:
    """queries[i]: a test-set index; demos[i]: the train-set indices of its demonstrations (in prompt order);
    orders[i] (prompt ensembling only): the P demo orders of its prompts."""

    queries: list[int]
    demos: list[list[int]]
    orders: list[list[list[int]]] | None = None


def ensemble_size(num_shots: int) -> int:
    """Prompt orders per query with ensembling: min(6, k!) for k effective demos, as the reference."""
    return min(6, math.factorial(effective_num_shots(num_shots)))


def plan_trial(
    num_test: int,
    num_train: int,
    *,
    num_shots: int,
    seed: int,
    num_samples: int = -1,
    query_set_size: int = 2048,
    permutations: int = 0,
    batch_size: int = 1,
    retrieve: Callable[[list[int], int], list[list[int]]] | None = None,
) -> TrialPlan:
    """The reference's draws for one trial (see the module docstring). num_samples <= 0: the whole test split.

    permutations > 0: prompt ensembling with that many orders per query, drawn per batch of `batch_size`.
    retrieve(test indices, k) -> their demos (RICES) replaces the random demos.
    A query set larger than the train split is cut to the split (the reference would fail).
    """
    if num_test < 1 or num_train < 1:
        raise ValueError(f"plan_trial: need test and train examples, got {num_test} test, {num_train} train")
    k = effective_num_shots(num_shots)
    if k > (num_train if retrieve is not None else min(query_set_size, num_train)):
        raise ValueError(f"{k} demonstrations per query need a query set of at least {k} train examples")
    n = num_samples if num_samples > 0 else num_test
    if n > num_test:
        raise ValueError(f"num_samples {n} exceeds the {num_test} test examples")
    rng = np.random.RandomState(seed)  # the legacy global stream np.random.seed(seed) starts
    samples = rng.choice(num_test, n, replace=False)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    queries = [int(samples[i]) for i in order]
    if retrieve is None:
        query_set = [int(i) for i in rng.choice(num_train, min(query_set_size, num_train), replace=False)]
    demo_rng = random.Random(seed)  # random.seed(seed + rank) with rank 0
    step = batch_size if permutations else max(len(queries), 1)  # batches matter only when shuffling
    demos, orders = [], []
    for start in range(0, len(queries), step):
        batch = queries[start : start + step]
        drawn = retrieve(batch, k) if retrieve is not None else [demo_rng.sample(query_set, k) for _ in batch]
        demos += [list(d) for d in drawn]
        if permutations:
            rows, per_query = [list(d) for d in drawn], [[] for _ in batch]
            for _ in range(permutations):
                for row, seen in zip(rows, per_query):
                    demo_rng.shuffle(row)
                    seen.append(list(row))
            orders += per_query
    return TrialPlan(queries, demos, orders if permutations else None)


def rank_batches(num_queries: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """This rank's batches: global batches of `batch_size` consecutive queries, dealt round-robin to the ranks.

    Every batch has the same members whatever the world size, so each query is generated with the same
    padding and neighbours (identical predictions on 1 or N ranks).
    """
    starts = range(0, num_queries, batch_size)
    return [
        range(s, min(s + batch_size, num_queries)) for b, s in enumerate(starts) if b % world_size == rank
    ]

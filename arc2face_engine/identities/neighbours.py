"""Exact nearest-neighbour search by cosine, in blocks, with torch (CPU or GPU).

Blocked brute force: memory is one `query_rows x key_rows` similarity block, never
queries x keys, so a million-row gallery against 100k queries runs in bounded memory.
Its cost is plain matmul (measured in bench/bench_identities.py); it is exact, which
a privacy check needs (an approximate index could miss the one close pair).
"""

from __future__ import annotations

import torch

QUERY_ROWS = 4096
KEY_ROWS = 16_384
def max_cosine(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_rows: int = QUERY_ROWS,
    key_rows: int = KEY_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(best cosine, index of the best key) per query row; rows are assumed unit-norm.

    Ties keep the lowest key index, so the answer does not depend on the block sizes.
    """
    count = len(queries)
    best = torch.full((count,), -torch.inf, dtype=queries.dtype, device=queries.device)
    best_index = torch.zeros(count, dtype=torch.long, device=queries.device)
    for key_start in range(0, len(keys), key_rows):
        block = keys[key_start : key_start + key_rows]
        for start in range(0, count, query_rows):
            values, index = (queries[start : start + query_rows] @ block.T).max(dim=1)
            better = values > best[start : start + query_rows]
            best[start : start + query_rows] = torch.where(
                better, values, best[start : start + query_rows]
            )
            best_index[start : start + query_rows] = torch.where(
                better, index + key_start, best_index[start : start + query_rows]
            )
    return best, best_index


def mutual_max_cosine(
    first: torch.Tensor,
    second: torch.Tensor,
    first_rows: int = QUERY_ROWS,
    second_rows: int = KEY_ROWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(best cosine, its index) for every row of `first` among `second`, and for every row
    of `second` among `first`, from one pass over the blocks (half the matmuls of two
    `max_cosine` calls); rows are assumed unit-norm; ties keep the lowest index."""
    best_first = torch.full((len(first),), -torch.inf, dtype=first.dtype, device=first.device)
    index_first = torch.zeros(len(first), dtype=torch.long, device=first.device)
    best_second = torch.full((len(second),), -torch.inf, dtype=first.dtype, device=first.device)
    index_second = torch.zeros(len(second), dtype=torch.long, device=first.device)
    for key_start in range(0, len(second), second_rows):
        keys = second[key_start : key_start + second_rows]
        span = slice(key_start, key_start + len(keys))
        for start in range(0, len(first), first_rows):
            block = first[start : start + first_rows] @ keys.T
            rows = slice(start, start + len(block))
            values, index = block.max(dim=1)
            better = values > best_first[rows]
            best_first[rows] = torch.where(better, values, best_first[rows])
            index_first[rows] = torch.where(better, index + key_start, index_first[rows])
            # A max over dim 0 is fast, an argmax over it is not (strided, 4x a matmul's
            # time on CPU): the index is taken, over a transposed copy, only for the
            # columns this block improves (all of them at first, then fewer and fewer).
            values = block.amax(dim=0)
            columns = torch.nonzero(values > best_second[span]).flatten()
            if len(columns):
                best_second[key_start + columns] = values[columns]
                picked = block.index_select(1, columns).T.contiguous()
                index_second[key_start + columns] = picked.argmax(dim=1) + start
    return best_first, index_first, best_second, index_second


def merge_top_k(
    best: torch.Tensor, best_index: torch.Tensor, values: torch.Tensor, index: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of two (rows, *) candidate sets, with their indices."""
    merged = torch.cat([best, values], dim=1)
    order = torch.topk(merged, k, dim=1).indices
    return merged.gather(1, order), torch.cat([best_index, index], dim=1).gather(1, order)

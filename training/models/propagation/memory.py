"""Memory read: affinity between memory and query keys (negative squared L2, softmax over memory) and readout.

Shapes: B batch, Dk key dim, Dv value dim, N objects, M memory positions (frames × h × w), Q query positions (h × w).
−|k_m − k_q|² = 2 k_m·k_q − |k_m|² − |k_q|²; the last term is the same for every memory position, so it cancels in
the softmax over memory and is never computed (STCN, Cheng et al. 2021). The affinity is laid out (B, Q, M) so that
the softmax and top-k run over the last axis, which exported graphs execute several times faster than another axis.
"""

from __future__ import annotations

import math

import torch


def affinity(memory_keys_bdm: torch.Tensor, query_keys_bdq: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """(B, Q, M): for each query position, a softmax over memory positions; top_k keeps the k best per query."""
    dk = memory_keys_bdm.shape[1]
    similarity = 2 * query_keys_bdq.transpose(1, 2) @ memory_keys_bdm  # (B, Q, M)
    similarity = (similarity - memory_keys_bdm.pow(2).sum(1).unsqueeze(1)) / math.sqrt(dk)
    if top_k is not None:
        k = torch.sym_min(top_k, similarity.shape[2])  # symbolic under export: the memory length is dynamic
        kth_best = similarity.topk(k, dim=2).values[:, :, -1:]  # (B, Q, 1)
        similarity = similarity.masked_fill(similarity < kth_best, float("-inf"))
    return similarity.softmax(dim=2)


def readout(affinity_bqm: torch.Tensor, memory_values_bndm: torch.Tensor) -> torch.Tensor:
    """(B, N, Dv, Q): each object's memory values, averaged with the affinity weights."""
    b, n, dv, m = memory_values_bndm.shape
    return (memory_values_bndm.reshape(b, n * dv, m) @ affinity_bqm.transpose(1, 2)).reshape(b, n, dv, -1)

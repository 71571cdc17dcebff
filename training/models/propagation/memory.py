"""Memory read: affinity between memory and query keys (negative squared L2, softmax over memory) and readout.

Shapes: B batch, Dk key dim, Dv value dim, N objects, M memory positions (frames × h × w), Q query positions (h × w).
−|k_m − k_q|² = 2 k_m·k_q − |k_m|² − |k_q|²; the last term is the same for every memory position, so it cancels in
the softmax over memory and is never computed (STCN, Cheng et al. 2021). The affinity is laid out (B, Q, M) so that
the softmax and top-k run over the last axis, which exported graphs execute several times faster than another axis.
With top-k, `read` gathers only the k values each query position reads instead of multiplying by a mostly-zero
(Q, M) matrix: k = 20 of M = 9·16·16 memory positions is about 1 % of the work.
"""

from __future__ import annotations

import math

import torch


def similarity(memory_keys_bdm: torch.Tensor, query_keys_bdq: torch.Tensor) -> torch.Tensor:
    """(B, Q, M): scaled negative squared L2 distance of every query position to every memory position."""
    dk = memory_keys_bdm.shape[1]
    dot = 2 * query_keys_bdq.transpose(1, 2) @ memory_keys_bdm  # (B, Q, M)
    return (dot - memory_keys_bdm.pow(2).sum(1).unsqueeze(1)) / math.sqrt(dk)


def affinity(memory_keys_bdm: torch.Tensor, query_keys_bdq: torch.Tensor) -> torch.Tensor:
    """(B, Q, M): for each query position, a softmax over all memory positions."""
    return similarity(memory_keys_bdm, query_keys_bdq).softmax(dim=2)


def readout(affinity_bqm: torch.Tensor, memory_values_bndm: torch.Tensor) -> torch.Tensor:
    """(B, N, Dv, Q): each object's memory values, averaged with the affinity weights."""
    b, n, dv, m = memory_values_bndm.shape
    return (memory_values_bndm.reshape(b, n * dv, m) @ affinity_bqm.transpose(1, 2)).reshape(b, n, dv, -1)


def read(
    memory_keys_bdm: torch.Tensor, query_keys_bdq: torch.Tensor, memory_values_bndm: torch.Tensor, top_k: int | None
) -> torch.Tensor:
    """(B, N, Dv, Q): the memory read for every query position; top_k: a softmax over its k best positions only."""
    if top_k is None:
        return readout(affinity(memory_keys_bdm, query_keys_bdq), memory_values_bndm)
    b, n, dv, m = memory_values_bndm.shape
    scores = similarity(memory_keys_bdm, query_keys_bdq)
    k = torch.sym_min(top_k, m)  # symbolic under export: the memory length is dynamic
    best, index = scores.topk(k, dim=2)  # (B, Q, k)
    weights = best.softmax(dim=2)
    q = index.shape[1]
    # Rows of (B·M, N·Dv): one gather of whole rows, which onnxruntime runs as plain copies.
    rows = memory_values_bndm.reshape(b, n * dv, m).transpose(1, 2).reshape(b * m, n * dv)
    offsets = (torch.arange(b, device=index.device) * m).reshape(b, 1, 1)
    picked = rows[(index + offsets).reshape(-1)].reshape(b, q, k, n * dv)
    mixed = (weights.unsqueeze(2) @ picked).reshape(b, q, n * dv)  # (B, Q, 1, k) @ (B, Q, k, N·Dv)
    return mixed.transpose(1, 2).reshape(b, n, dv, q)

"""Low-rank token embeddings: E ~ A B (issue 10, section 2).

A table E (vocab x d) becomes A (vocab x k) and B (k x d): a lookup gathers k-wide rows of A, then one
small matmul by B gives the d-wide embeddings. It exports to ONNX as Gather + MatMul. The factors come
from the SVD of E (best in ||E - E_k||_F), or of D^(1/2) E with D a diagonal of per-token weights (best
in the embedding's output error over a token distribution: the calibration tokens, see
transforms/_lowrank_embeddings.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LowRankEmbedding(nn.Module):
    """``forward(ids) = A[ids] @ B``. ``padding_idx`` is kept for what it means in training (no gradient
    to that row of A); inference reads it like any other row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, *, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not 1 <= rank <= min(num_embeddings, embedding_dim):
            raise ValueError(f"rank {rank} is outside [1, {min(num_embeddings, embedding_dim)}]")
        self.num_embeddings, self.embedding_dim, self.rank = int(num_embeddings), int(embedding_dim), int(rank)
        self.padding_idx = padding_idx
        self.A = nn.Parameter(torch.zeros(num_embeddings, rank, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(rank, embedding_dim, dtype=dtype, device=device))

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.A, self.padding_idx) @ self.B

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, rank: int, bias: bool = False, *,
              dtype: torch.dtype = torch.float32, device=None) -> "LowRankEmbedding":
        """Factors to be filled by a checkpoint (the structure names the shape and rank)."""
        if bias:
            raise ValueError("an embedding has no bias")
        return cls(num_embeddings, embedding_dim, rank, dtype=dtype, device=device)

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, embedding: nn.Embedding, rank: int, row_weights: Tensor | None = None) -> "LowRankEmbedding":
        """The rank-`rank` factorization of ``embedding.weight``: plain SVD, or with ``row_weights`` (one
        positive weight per row) the one best in the weighted error sum_t w_t ||E_t - (A B)_t||^2."""
        e = embedding.weight.detach().to(torch.float64)
        scale = None if row_weights is None else row_weights.to(torch.float64).clamp_min(1e-12).sqrt()[:, None]
        u, s, vh = torch.linalg.svd(e if scale is None else e * scale, full_matrices=False)
        a = u[:, :rank] * s[:rank]
        if scale is not None:
            a = a / scale
        new = cls(embedding.num_embeddings, embedding.embedding_dim, rank, padding_idx=embedding.padding_idx,
                  dtype=embedding.weight.dtype, device=embedding.weight.device)
        new.A.copy_(a.to(new.A.dtype))
        new.B.copy_(vh[:rank].to(new.B.dtype))
        return new

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"

"""Low-rank token embeddings: E ~ A B (issue 10, section 2).

A table E (vocab x d) becomes A (vocab x k) and B (k x d): a lookup gathers k-wide rows of A, then one
small matmul by B gives the d-wide embeddings. It exports to ONNX as Gather + MatMul. The factors come
from the SVD of E (best in ||E - E_k||_F), or of D^(1/2) E with D a diagonal of per-token weights (best
in the embedding's output error over a token distribution: the calibration tokens, see
transforms/_lowrank_embeddings.py).

With ``kept`` rows (the calibration's most frequent tokens), those rows are stored exactly beside the
factors: ``slots`` (an int32 per vocabulary row) points each kept token at its row of ``D`` and every
other token at D's last row, which is zero; their rows of A are zero. A kept row costs d elements and a
rank k (vocab + d), so on a large vocabulary a few hundred exact frequent rows cost as much as a few
ranks and remove most of the error the text actually sees. It exports as Gather + MatMul + Gather +
Gather + Add."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LowRankEmbedding(nn.Module):
    """``forward(ids) = A[ids] @ B``. ``padding_idx`` is kept for what it means in training (no gradient
    to that row of A); inference reads it like any other row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, *, kept: int = 0,
                 padding_idx: int | None = None, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not 1 <= rank <= min(num_embeddings, embedding_dim):
            raise ValueError(f"rank {rank} is outside [1, {min(num_embeddings, embedding_dim)}]")
        if not 0 <= kept <= num_embeddings:
            raise ValueError(f"kept rows {kept} is outside [0, {num_embeddings}]")
        self.num_embeddings, self.embedding_dim, self.rank = int(num_embeddings), int(embedding_dim), int(rank)
        self.kept, self.padding_idx = int(kept), padding_idx
        self.A = nn.Parameter(torch.zeros(num_embeddings, rank, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(rank, embedding_dim, dtype=dtype, device=device))
        if self.kept:
            self.D = nn.Parameter(torch.zeros(self.kept + 1, embedding_dim, dtype=dtype, device=device))
            self.register_buffer("slots", torch.full((num_embeddings,), self.kept, dtype=torch.int32, device=device))

    def forward(self, ids: Tensor) -> Tensor:
        out = F.embedding(ids, self.A, self.padding_idx) @ self.B
        return out + F.embedding(self.slots[ids], self.D) if self.kept else out

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, rank: int, bias: bool = False, *, kept: int = 0,
              dtype: torch.dtype = torch.float32, device=None) -> "LowRankEmbedding":
        """Factors to be filled by a checkpoint (the structure names the shape, rank and kept rows)."""
        if bias:
            raise ValueError("an embedding has no bias")
        return cls(num_embeddings, embedding_dim, rank, kept=kept, dtype=dtype, device=device)

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, embedding: nn.Embedding, rank: int, row_weights: Tensor | None = None,
                       kept_rows: Tensor | None = None) -> "LowRankEmbedding":
        """The rank-`rank` factorization of ``embedding.weight`` best in ||E - A B||_F, or with ``row_weights``
        (one positive weight per row) the one best in the weighted error sum_t w_t ||E_t - (A B)_t||^2.
        ``kept_rows``: row ids stored exactly; the factors then serve the other rows alone."""
        e = embedding.weight.detach().to(torch.float64)
        kept = 0 if kept_rows is None else int(kept_rows.numel())
        w = torch.ones(e.shape[0], dtype=torch.float64) if row_weights is None else row_weights.to(torch.float64)
        if kept:
            w = w.clone()
            w[kept_rows] = 0.0
        # The best B (rank x d, orthonormal rows) spans the top eigenvectors of E^T D E (the weighted table's
        # right singular vectors), and for it the best A is E B^T whatever the weights: one d x d
        # eigendecomposition, not an SVD of the vocab x d table (5x faster on MiniLM's 30522 x 384).
        vecs = torch.linalg.eigh((e * w[:, None]).T @ e)[1]
        vh = vecs.flip(1)[:, :rank].T
        a = e @ vh.T
        new = cls(embedding.num_embeddings, embedding.embedding_dim, rank, kept=kept, padding_idx=embedding.padding_idx,
                  dtype=embedding.weight.dtype, device=embedding.weight.device)
        if kept:
            a[kept_rows] = 0.0  # served by D alone
            new.D[:kept].copy_(embedding.weight.detach()[kept_rows])
            new.slots[kept_rows] = torch.arange(kept, dtype=torch.int32)
        new.A.copy_(a.to(new.A.dtype))
        new.B.copy_(vh[:rank].to(new.B.dtype))
        return new

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}" + (f", kept={self.kept}" if self.kept else "")

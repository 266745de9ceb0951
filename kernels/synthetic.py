"""Seeded embeddings with structure, for demos, tests and benchmarks.

Like faiss's SyntheticDataset: points live near clusters in a low-dimensional latent space and
are lifted to `dim` by a fixed random non-linear map, so they have low intrinsic dimension and
real neighbourhood structure (uniform noise would make every codec look alike).
"""

from __future__ import annotations

import numpy as np


class ClusteredEmbeddings:
    """A reproducible generator: the same (dim, seed) always gives the same distribution and
    `batch(start, n)` always the same rows, so a corpus can be written chunk by chunk."""

    def __init__(self, dim: int, *, seed: int = 0, num_clusters: int = 256,
                 intrinsic_dim: int = 24, noise: float = 0.05):
        if dim < 2:
            raise ValueError("dim must be at least 2")
        self.dim = dim
        self.seed = seed
        self.intrinsic_dim = min(intrinsic_dim, dim)
        self.noise = noise
        rs = np.random.default_rng(seed)
        self.centroids = rs.normal(size=(num_clusters, self.intrinsic_dim)) * 1.5
        self.spread = rs.uniform(0.3, 1.0, size=num_clusters)
        self.weights = rs.dirichlet(np.full(num_clusters, 2.0))
        self.lift = rs.normal(size=(self.intrinsic_dim, dim)) / np.sqrt(self.intrinsic_dim)
        self.bias = rs.normal(size=dim) * 0.3

    def batch(self, start: int, n: int) -> np.ndarray:
        """The chunk of n rows starting at `start`, float32 of shape (n, dim).

        Seeded by (seed, start): the same call always returns the same rows."""
        rs = np.random.default_rng([self.seed, 1, start])
        labels = rs.choice(len(self.weights), size=n, p=self.weights)
        z = self.centroids[labels] + rs.normal(size=(n, self.intrinsic_dim)) * self.spread[labels, None]
        x = np.tanh(z @ self.lift + self.bias) + self.noise * rs.normal(size=(n, self.dim))
        return x.astype(np.float32)

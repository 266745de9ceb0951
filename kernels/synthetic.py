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


class PowerLawEmbeddings:
    """Gaussian clusters whose spread falls off as a power of the axis: the variance along the
    i-th of `dim` axes goes as i^-decay, in a fixed random rotation. Text embeddings' spectra
    fall off slowly like this, where ClusteredEmbeddings' rows sit near a 24-dimensional
    surface plus isotropic noise; a codec's training can win on one and lose on the other
    (BENCHMARKS.md: a residual stage's last k-means step). The same (dim, seed) and
    `batch(start, n)` always give the same rows."""

    def __init__(self, dim: int, *, seed: int = 0, num_clusters: int = 2000, decay: float = 0.9,
                 spread: float = 0.7):
        if dim < 2:
            raise ValueError("dim must be at least 2")
        self.dim = dim
        self.seed = seed
        self.spread = spread
        rs = np.random.default_rng(seed)
        self.scale = (np.arange(1, dim + 1) ** (-decay / 2)).astype(np.float32)
        rotation, _ = np.linalg.qr(rs.normal(size=(dim, dim)))
        self.rotation = rotation.astype(np.float32)
        self.means = (rs.normal(size=(num_clusters, dim)) * self.scale).astype(np.float32)

    def batch(self, start: int, n: int) -> np.ndarray:
        """The chunk of n rows starting at `start`, float32 of shape (n, dim), seeded by
        (seed, start)."""
        rs = np.random.default_rng([self.seed, 2, start])
        labels = rs.integers(0, len(self.means), size=n)
        noise = rs.standard_normal(size=(n, self.dim), dtype=np.float32)
        z = self.means[labels] + self.spread * noise * self.scale
        return np.ascontiguousarray(z @ self.rotation, dtype=np.float32)

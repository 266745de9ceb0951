"""The generated corpora the advisor's benchmarks share (`--data`): rows clustered near a
24-dimensional surface plus isotropic noise (kernels.synthetic.ClusteredEmbeddings, what
they measured first), or Gaussian clusters with a power-law spectrum (PowerLawEmbeddings,
falling off as text embeddings' spectra do)."""

from __future__ import annotations

import argparse

from vecpress.kernels.synthetic import ClusteredEmbeddings, PowerLawEmbeddings

KINDS = ("clustered", "powerlaw")


def add_data_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", choices=KINDS, default="clustered",
                    help="clustered: near a 24-d surface plus noise; powerlaw: a spectrum falling off as i^-0.9")


def generator(kind: str, dim: int, seed: int, clusters: int = 300):
    """The corpus's generator (`.batch(start, n)`); `clusters` for the clustered kind."""
    if kind == "clustered":
        return ClusteredEmbeddings(dim, seed=seed, num_clusters=clusters)
    return PowerLawEmbeddings(dim, seed=seed)

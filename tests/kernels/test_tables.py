"""Look-up-table distances to additive codes stored relative to a centroid (kernels.codecs.tables)."""

from __future__ import annotations

import numpy as np
import pytest

from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.codecs.tables import code_terms, l2_by_tables, query_tables, table_codebooks, table_sums
from vecpress.kernels.synthetic import ClusteredEmbeddings


@pytest.fixture(scope="module")
def data():
    x = ClusteredEmbeddings(24, seed=3, num_clusters=20).batch(0, 3000)
    return x[:2500], x[2500:2540]


@pytest.mark.parametrize("spec", ["RQ4x8", "RQ3x8,beam=4", "LSQ2x8"])
def test_tables_give_the_distance_to_centroid_plus_decoded_residual(data, spec):
    xt, xq = data
    codec = Codec.train(xt, spec, "l2", seed=0, ngpu=0)
    books = table_codebooks(codec.index)
    assert books is not None and books.shape == (codec.code_size, 256, 24)
    centroid = xt[:100].mean(axis=0)
    codes = codec.encode(xt[:400] - centroid)
    r = codec.decode(codes).astype(np.float64)
    terms = code_terms(codec.decode, codes, np.broadcast_to(centroid, (len(codes), 24)))
    np.testing.assert_allclose(terms, (r * r).sum(1) + 2 * r @ centroid.astype(np.float64), rtol=1e-5, atol=1e-5)
    tables = query_tables(books, xq)
    np.testing.assert_allclose(table_sums(tables, codes), xq.astype(np.float64) @ r.T, rtol=1e-5, atol=1e-4)
    d = l2_by_tables(tables, codes, terms, xq, centroid)
    exact = ((xq[:, None, :].astype(np.float64) - centroid - r[None]) ** 2).sum(-1)
    np.testing.assert_allclose(d, exact, rtol=1e-4, atol=1e-4)
    assert (d >= 0).all()


def test_a_query_s_distances_are_the_same_bytes_alone_or_in_a_batch(data):
    xt, xq = data
    codec = Codec.train(xt, "RQ4x8", "l2", seed=0, ngpu=0)
    books, centroid = table_codebooks(codec.index), xt[:50].mean(axis=0)
    codes = codec.encode(xt[:300] - centroid)
    terms = code_terms(codec.decode, codes, np.broadcast_to(centroid, (len(codes), 24)))
    tables = query_tables(books, xq)
    batch = l2_by_tables(tables, codes, terms, xq, centroid)
    for q in (0, 7, 39):
        alone = l2_by_tables(query_tables(books, xq[q:q + 1]), codes, terms, xq[q:q + 1], centroid)
        np.testing.assert_array_equal(alone[0], batch[q])


@pytest.mark.parametrize("spec", ["PQ4", "SQ8", "PCA16,RQ2x8", "RQ2x4", "PRQ2x2x8"])
def test_other_codecs_have_no_tables(data, spec):
    codec = Codec.train(data[0], spec, "l2", seed=0, ngpu=0)
    assert table_codebooks(codec.index) is None

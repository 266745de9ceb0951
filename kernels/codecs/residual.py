"""Residual quantizers (RQ, and PRQ's sub-quantizers) trained stage by stage from Python, so that
training reports each stage done (`progress(done, total)`, total = every stage of every
sub-quantizer) and the caller can say how long is left.

faiss's ResidualQuantizer.train runs every stage in one call with no way to hear from it. For
the training `train_index` does on the CPU (greedy: beam 1; progressive-dimension k-means; no
codebook refinement) this module does what that call does, step for step, with faiss's own
pieces: per stage a progressive-dimension k-means on the residuals with the quantizer's
clustering parameters, the nearest new centroid of each residual (IndexFlatL2, as faiss's beam
search of width 1 finds it) subtracted, then the range of reconstruction norms (the same
distance kernel) and, where something reads them (`_reads_tables`), the codebook tables: they
are not serialised, and RQ64x8's cross products alone are 528 MB (0.75 s to compute at 384-d,
1.1 s at 768-d), which faiss's training computes whatever the codec. With faiss's
ProgressiveDimClustering per stage the trained index is byte for byte the one faiss's train
gives (tests/kernels/test_residual.py compares the serialised bytes); vecpress's own
`progressive_kmeans` differs from it in the principal axes, numpy's instead of faiss's
PCAMatrix, and in clustering the rows unrotated in the last step (the same k-means error, at a
fraction of the time at high dimensions). Anything else
(a wider training beam, codebook refinement) trains through faiss (`trains_stagewise` says
which). On a GPU the same training runs with GPU flat indexes assigning (`gpu_flat`): each
k-means iteration's assignment and each stage's nearest centroids. A longer RQ can train on
from a shorter one's stages (`first`, kernels.codecs.nested.train_on).

Encoding with a beam of 1 (`encode_greedy`, what Codec.encode uses for `RQ<m>x8,beam=1`) is the
same walk: the nearest centroid per stage by one matrix product of a block of rows, the blocks
on every core.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

from vecpress.kernels._faiss import faiss
from vecpress.kernels.codecs.build import _innermost

#: rows per block when subtracting each stage's centroids from the residuals
_BLOCK = 4096
#: rows per block (and core) of encode_greedy: the block's residuals and distances stay in cache
_ENCODE_BLOCK = 1024
#: bytes of the blocks' covariance products held at once (each d x d floats)
_PRODUCTS_HELD = 256 << 20
#: progressive_kmeans's principal axes come from numpy's full eigh up to this many dims (and
#: where a third of the axes or more are read); above, from a randomized subspace iteration
EXACT_AXES_DIM = 512
#: progressive_kmeans's principal axes come from the randomized iteration at any dims where at
#: most 1/FEW_AXES of them are read (a judged residual quantizer's 2 steps, pipeline.sweep.
#: JUDGING_RQ_STEPS: d^(1/2), 19 of 384; a kept one's 4 read d^(3/4), 86 of 384): at 384-d eigh
#: took 13 ms of a stage's 22 ms for its axes, the iteration 3 ms (BENCHMARKS.md)
FEW_AXES = 8
AXES_OVERSAMPLE = 16
AXES_ITERATIONS = 2
#: progressive_kmeans's principal axes come from the covariance of at most this many rows (or
#: twice the dims, if more), evenly spaced: they only start its k-means. Their covariance was a
#: fifth of an RQ stage's training on 10,000 x 384-d rows and a third at 768-d; from 4,096 rows
#: the trained codecs' error came out the same (RQ16x8 on 10,000 x 384- and 768-d, RQ8x8 on
#: 65,536 x 768-d: within 0.3%, either way; BENCHMARKS.md)
AXES_ROWS = 4096


def residual_quantizers(inner) -> list:
    """The residual quantizers a codec trains: an RQ's, or each of a PRQ's."""
    if isinstance(inner, faiss.IndexResidualQuantizer):
        return [inner.rq]
    if isinstance(inner, faiss.IndexProductResidualQuantizer):
        return [faiss.downcast_AdditiveQuantizer(inner.prq.subquantizer(i)) for i in range(inner.prq.nsplits)]
    return []


def load_index(data):
    """A faiss index read back from `serialize_index` bytes (bytes or a uint8 array), its
    residual quantizers without the codebook tables unless something reads them
    (`_reads_tables`). faiss computes the tables on every read unless told not to: 0.29 s
    and 130 MB for an RQ32x8 at 768-d, which nothing else here reads (drop_cross_products)."""
    array = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
    index = faiss.deserialize_index(array, faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
    for rq in residual_quantizers(_innermost(index)[1]):
        if _reads_tables(rq):
            rq.compute_codebook_tables()
    return index


def _reads_tables(rq) -> bool:
    """Whether anything reads the codebook tables of residual quantizer `rq`: look-up-table
    beam search (`use_beam_LUT`) or the ST_norm_from_LUT search."""
    return bool(int(rq.use_beam_LUT)) or int(rq.search_type) == faiss.AdditiveQuantizer.ST_norm_from_LUT


def drop_cross_products(index) -> None:
    """Free the codebook cross-product tables of `index`'s residual quantizers where nothing
    reads them (faiss computes them in training, and on reading but for load_index; only
    look-up-table beam search, `use_beam_LUT`, and the ST_norm_from_LUT search use them). They
    grow with the square of the codebooks, not with the dimension: 130 MB for RQ32x8, 528 MB
    for RQ64x8, held by every process that loads the codec and copied by every clone of it.
    They are not serialised: the codec's bytes do not change."""
    for rq in residual_quantizers(_innermost(index)[1]):
        if not _reads_tables(rq):
            rq.codebook_cross_products.swap(faiss.Float32Vector())  # (resize(0) keeps the memory)


def first_stages(start, inner) -> np.ndarray:
    """The (m, 2^nbits, d) codebooks of trained index `start`, a residual quantizer of fewer
    stages than `inner` (an untrained RQ) of the same dimension, with the same pre-transforms:
    what train_stagewise takes as `inner`'s first stages (kernels.codecs.nested)."""
    chain, short = _innermost(start)
    if not isinstance(short, faiss.IndexResidualQuantizer) or not isinstance(inner, faiss.IndexResidualQuantizer) \
            or int(short.rq.M) >= int(inner.rq.M) or int(short.rq.d) != int(inner.rq.d):
        raise ValueError("training on from a shorter codec needs a trained RQ of fewer stages and the same dimension")
    rq = short.rq
    return faiss.vector_to_array(rq.codebooks).reshape(int(rq.M), -1, int(rq.d))


def trains_stagewise(inner) -> bool:
    """Whether `inner` (an index's innermost quantizer) is an untrained RQ or PRQ whose
    training `train_stagewise` reproduces: beam 1, progressive-dimension k-means only, no
    assignment factory of faiss's own."""
    qs = residual_quantizers(inner)
    return bool(qs) and not inner.is_trained and all(
        int(q.max_beam_size) == 1 and int(q.train_type) == faiss.ResidualQuantizer.Train_progressive_dim
        and q.assign_index_factory is None for q in qs)


def train_stagewise(inner, x: np.ndarray, progress=None, first: np.ndarray | None = None, gpu_flat=None,
                    last_iterations: int | None = None) -> None:
    """Train `inner` (trains_stagewise) on `x` (float32, already through any pre-transform),
    calling `progress(done, total)` after each stage it trains. `first` (an RQ only): the (m, 2^nbits, d)
    codebooks of its first m stages as this training trains them on `x` (a shorter codec of
    the family trained on the same rows, kernels.codecs.nested): those stages are taken, not
    trained again, and the codec comes out as trained from nothing. `gpu_flat(d)`: a GPU flat
    L2 index of dimension d (faiss.GpuIndexFlatL2 on resources the caller holds) to assign
    with, in the k-means and the stages; None: the CPU's. `last_iterations`: the iterations of
    each stage's last k-means step (progressive_kmeans), if not the quantizer's."""
    qs = residual_quantizers(inner)
    total, done = sum(int(q.M) for q in qs) - (0 if first is None else len(first)), 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    x = np.ascontiguousarray(x, dtype=np.float32)
    if first is not None and not isinstance(inner, faiss.IndexResidualQuantizer):
        raise ValueError("only a residual quantizer (RQ) trains on from the first stages of a shorter one")
    if isinstance(inner, faiss.IndexResidualQuantizer):
        _train_rq(inner.rq, x, step, first, gpu_flat, last_iterations)
    else:
        _train_prq(inner.prq, qs, x, step, gpu_flat, last_iterations)
    inner.is_trained = True


def _train_rq(rq, x: np.ndarray, step, first: np.ndarray | None = None, gpu_flat=None,
              last_iterations: int | None = None) -> None:
    """ResidualQuantizer::train with a beam of 1, one stage at a time; the stages of `first`
    (codebooks) taken as trained: the residuals they leave, as their training left them."""
    n, d = x.shape
    nbits = faiss.vector_to_array(rq.nbits)
    residuals = x.copy()
    taken = 0 if first is None else len(first)
    books = []
    for m in range(int(rq.M)):
        k = 1 << int(nbits[m])
        if m < taken and first[m].shape != (k, d):
            raise ValueError(f"stage {m}'s codebook is {first[m].shape}, not ({k}, {d})")
        book = np.ascontiguousarray(first[m], dtype=np.float32) if m < taken else \
            progressive_kmeans(residuals, k, rq.cp, gpu_flat, last_iterations)
        assign = (gpu_flat or faiss.IndexFlatL2)(d)
        assign.add(book)
        _subtract_nearest(assign, book, residuals)
        books.append(book)
        if m >= taken:
            step()
    faiss.copy_array_to_vector(np.concatenate(books).ravel(), rq.codebooks)
    rq.is_trained = True
    norms = np.empty(n, dtype=np.float32)  # |x - residual|^2, faiss's kernel (same rounding)
    rows = np.arange(n, dtype=np.int64)  # (held: swig_ptr keeps no reference)
    faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(norms), faiss.swig_ptr(x), faiss.swig_ptr(residuals),
                            faiss.swig_ptr(rows), d, n, 1)
    rq.train_norm(n, faiss.swig_ptr(norms))
    if _reads_tables(rq):  # (faiss's own training computes them for any codec: RQ64x8's cross products, 528 MB)
        rq.compute_codebook_tables()


def progressive_kmeans(x: np.ndarray, k: int, cp, gpu_flat=None, last_iterations: int | None = None) -> np.ndarray:
    """faiss's ProgressiveDimClustering (`apply_pca`, flat L2 assignment): the rows rotated
    onto their principal axes, k-means on the first d^(i/steps) of them for step i = 1..steps,
    each step starting from the last one's centroids padded with zeros; (k, d) centroids. The
    last step, on all d axes, clusters the rows as they are from its start rotated back (the
    distances and means are the rotated ones, to rounding), so only the axes the steps before it
    read are computed for every row (768-d in 4 steps: 145 of 768), and only those axes
    (`_principal_axes`: numpy's eigh, or above EXACT_AXES_DIM dims a randomized subspace
    iteration). faiss's PCAMatrix takes about 0.5 s at 768-d whatever the rows (its
    eigendecomposition; numpy's: 0.08 s; the randomized one: 0.03 s), once per stage, which was
    most of an RQ stage's training on 10,000 rows, and grows with d^3 (3072-d: 4.6 s, 0.9 s
    randomized; tests/kernels/test_residual.py compares the quantization error with faiss's).
    The covariance and the rotation go _BLOCK rows a task on every core (`_by_blocks`).
    `gpu_flat`: as train_stagewise's. `last_iterations`: the last step's iterations, if not
    cp.niter."""
    n, d = x.shape
    dims = step_dims(d, int(cp.progressive_dim_steps))
    partial = max([di for di in dims if di < d], default=0)  # (the axes the steps before the last read)
    with _one_blas_thread():
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    head = _principal_axes(x, mean, partial, int(cp.seed)) if partial else None
    rotated = np.empty((n, partial), np.float32)

    def rotate(i: int) -> None:
        rotated[i:i + _BLOCK] = (x[i:i + _BLOCK] - mean) @ head.T

    for _ in _by_blocks(rotate, n) if partial else ():
        pass
    centroids, last = None, 0
    for di in dims:
        clustering = faiss.Clustering(di, k, cp)
        if di == d and last_iterations is not None:
            clustering.niter = last_iterations
        if centroids is not None:
            padded = np.zeros((k, di), np.float32)
            padded[:, :last] = centroids
            if di == d:  # (the last step clusters the rows as they are: its start rotated back)
                with _one_blas_thread():
                    padded = np.ascontiguousarray(centroids @ head[:last] + mean)
            faiss.copy_array_to_vector(padded.ravel(), clustering.centroids)
        clustering.train(x if di == d else np.ascontiguousarray(rotated[:, :di]), (gpu_flat or faiss.IndexFlatL2)(di))
        centroids, last = faiss.vector_to_array(clustering.centroids).reshape(k, di), di
    return np.ascontiguousarray(centroids)


def step_dims(d: int, steps: int) -> list[int]:
    """The dims progressive_kmeans's steps cluster on: d^(i/steps) for step i = 1..steps (the
    last: d)."""
    return [int(d ** ((1.0 + step) / steps)) for step in range(steps)]


def _principal_axes(x: np.ndarray, mean: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """The (count, d) first principal axes of rows `x` about `mean`, one per row, largest
    first, from the covariance of at most AXES_ROWS of them (or twice the dims, if more; evenly
    spaced), summed from _BLOCK rows a task on every core (`_by_blocks`): numpy's eigh of it,
    or where that costs much (`count` <= d / 3 above EXACT_AXES_DIM dims, or <= d / FEW_AXES)
    a seeded randomized subspace iteration (`_top_axes`), since eigh grows with d^3: 0.08 s
    at 768-d, 4.6 s at 3072-d, once per stage."""
    d = x.shape[1]
    most = max(AXES_ROWS, 2 * d)
    if len(x) > most:  # (evenly spaced rows: the same ones on any machine)
        x = x[::len(x) // most][:most]

    def products(i: int) -> np.ndarray:
        centred = x[i:i + _BLOCK] - mean
        return centred.T @ centred

    cov = np.zeros((d, d), np.float64)
    held = max(1, _PRODUCTS_HELD // (4 * d * d))  # (3072-d: 7 of 38 MB each)
    for product in _by_blocks(products, len(x), held):  # (summed in the rows' order: the same bytes on any cores)
        cov += product
    with _one_blas_thread():
        if 3 * count > d or (d <= EXACT_AXES_DIM and FEW_AXES * count > d):
            vectors = np.linalg.eigh(cov)[1][:, ::-1][:, :count]
        else:
            vectors = _top_axes(cov, count, seed)
    return np.ascontiguousarray(vectors.T, dtype=np.float32)


def _top_axes(cov: np.ndarray, count: int, seed: int) -> np.ndarray:
    """(d, count): the first `count` eigenvectors of symmetric `cov`, largest first, by a
    randomized subspace iteration (Halko, Martinsson and Tropp 2011): a seeded Gaussian block of
    count + AXES_OVERSAMPLE columns through AXES_ITERATIONS products with `cov`, then the
    eigenvectors of `cov` within that span. On power-law rows they capture 99.1-99.2% of the
    variance the exact first axes do (768- and 3072-d), at 0.03 s against eigh's 0.08 s at
    768-d, 0.9 s against 4.6 s at 3072-d; they only start the last k-means step."""
    block = np.random.default_rng(seed).standard_normal((cov.shape[0], count + AXES_OVERSAMPLE))
    span = np.linalg.qr(cov @ block)[0]
    for _ in range(AXES_ITERATIONS):
        span = np.linalg.qr(cov @ span)[0]
    _, vectors = np.linalg.eigh(span.T @ cov @ span)
    return (span @ vectors[:, ::-1])[:, :count]


def faiss_progressive_kmeans(x: np.ndarray, k: int, cp, gpu_flat=None,
                             last_iterations: int | None = None) -> np.ndarray:
    """faiss's own ProgressiveDimClustering (its PCAMatrix), what faiss's RQ training runs per
    stage: the reference `progressive_kmeans` is measured against (tests, benchmarks/rq_train.py).
    Given `gpu_flat`, with faiss's GPU index factory assigning. Every step runs cp.niter
    iterations (`last_iterations` given: ValueError)."""
    if last_iterations is not None:
        raise ValueError("faiss's progressive k-means runs cp.niter iterations in every step")
    factory = faiss.ProgressiveDimIndexFactory() if gpu_flat is None else faiss.GpuProgressiveDimIndexFactory(1)
    clustering = faiss.ProgressiveDimClustering(x.shape[1], k, cp)
    clustering.train(len(x), faiss.swig_ptr(np.ascontiguousarray(x, dtype=np.float32)), factory)
    return faiss.vector_to_array(clustering.centroids).reshape(k, x.shape[1])


@functools.cache
def _blas():
    return ThreadpoolController()


def _by_blocks(task, n: int, most: int | None = None, block: int = _BLOCK):
    """`task(i)` for the blocks of `block` rows of n rows (i: each block's first row), on as
    many threads as faiss's OpenMP uses (at most `most`), numpy's BLAS on one thread in each:
    a block's product is then the same bytes whatever the cores, and the cores are busy where
    numpy's own threads split one small product (and spin after it, _one_blas_thread). Yields
    the results in the blocks' order, holding at most one round of them (a thread's each)."""
    starts = range(0, n, block)
    width = max(1, min(faiss.omp_get_max_threads(), most or len(starts), len(starts)))
    with _one_blas_thread(), ThreadPoolExecutor(width) as pool:
        for j in range(0, len(starts), width):
            yield from pool.map(task, starts[j:j + width])


def _one_blas_thread():
    """numpy's BLAS on one thread: its pool (pthreads) spins for a while after each call and
    takes a core from faiss's OpenMP k-means that follows (RQ16x8 on 10,000 x 128-d rows:
    2.3 s instead of 0.7 s)."""
    return _blas().limit(limits=1, user_api="blas")


def _subtract_nearest(index, book: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """One greedy stage: the nearest centroid of `book` (held by flat `index`) of each row of
    `residuals`, subtracted from it in place; returns their numbers. Subtracted _BLOCK rows at
    a time: one gather of 65,536 x 768 floats took 1.25 s here, blocks 0.04 s."""
    nearest = index.search(residuals, 1)[1][:, 0]
    for i in range(0, len(residuals), _BLOCK):
        residuals[i:i + _BLOCK] -= book[nearest[i:i + _BLOCK]]
    return nearest


def _train_prq(prq, qs: list, x: np.ndarray, step, gpu_flat=None, last_iterations: int | None = None) -> None:
    """ProductAdditiveQuantizer::train: each sub-quantizer on its slice of dimensions, then
    the whole codebook and the range of reconstruction norms."""
    n, d = x.shape
    recon, offset = np.empty_like(x), 0
    for q in qs:
        part = np.ascontiguousarray(x[:, offset:offset + int(q.d)])
        _train_rq(q, part, step, gpu_flat=gpu_flat, last_iterations=last_iterations)
        recon[:, offset:offset + int(q.d)] = q.decode(q.compute_codes(part))  # (no norm to pack)
        offset += int(q.d)
    faiss.copy_array_to_vector(np.concatenate([faiss.vector_to_array(q.codebooks) for q in qs]), prq.codebooks)
    prq.is_trained = True
    norms = np.empty(n, dtype=np.float32)
    faiss.fvec_norms_L2sqr(faiss.swig_ptr(norms), faiss.swig_ptr(recon), d, n)
    prq.train_norm(n, faiss.swig_ptr(norms))


def greedy_codebooks(inner) -> np.ndarray | None:
    """The (M, 256, d) codebooks of a trained RQ that encodes greedily (beam 1) into one byte
    per stage and no norm, which `encode_greedy` encodes; None for any other codec."""
    if not isinstance(inner, faiss.IndexResidualQuantizer) or not inner.is_trained:
        return None
    rq = inner.rq
    plain = (faiss.AdditiveQuantizer.ST_decompress, faiss.AdditiveQuantizer.ST_LUT_nonorm)
    if int(rq.max_beam_size) != 1 or int(rq.search_type) not in plain or \
            (faiss.vector_to_array(rq.nbits) != 8).any():
        return None
    return faiss.vector_to_array(rq.codebooks).reshape(int(rq.M), 256, int(rq.d))


def codebook_norms(books: np.ndarray) -> np.ndarray:
    """The (M, K) squared norms of (M, K, d) codebooks' centroids, as encode_greedy uses them."""
    return np.einsum("mkd,mkd->mk", books, books)


def encode_greedy(books: np.ndarray, x: np.ndarray, first: np.ndarray | None = None,
                  norms: np.ndarray | None = None) -> np.ndarray:
    """(n, M) uint8 codes of `x` (prepared, through any pre-transform) by a residual quantizer
    of beam 1: at each stage the nearest centroid of the residual, subtracted. The nearest is
    the least ||c||^2 - 2 r.c (||r||^2 is the same for every c), by one matrix product per
    stage of a block of _ENCODE_BLOCK rows, the blocks on every core (`_by_blocks`, numpy's
    BLAS on one thread in each: the same bytes whatever the cores). faiss's encoder (a beam
    search of width 1), and a flat index's search per stage as this did before, find the same
    centroids, near-ties aside (under 4e-5 of the bytes; tests/kernels/test_residual.py),
    slower on 2 cores (benchmarks/greedy_encode.py): RQ32x8 over 50,000 rows at 768-d 3.6 s by
    the flat index against 3.0 s here, at 384-d 1.8 s against 1.5 s, at 128-d 0.85 s against
    0.63 s (a flat index splits each block's small product over the cores); on one core (a Ray
    task's) the same time. The residuals held are a block's per core. `first`: (n, m) codes of
    the same `x` by the first m stages (a shorter codec of the family, kernels.codecs.nested):
    their centroids are subtracted as encoding subtracts them, not searched, so the codes are
    those encoding from nothing gives, byte for byte, at the search of the other stages only.
    `norms`: the (M, 256) squared norms of the centroids (`codebook_norms`), where the caller
    keeps them for every call (Codec.encode calls this once per block of rows)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    taken = 0 if first is None else first.shape[1]
    if first is not None and (first.shape[0] != len(x) or taken > len(books)):
        raise ValueError(f"first stages' codes {first.shape} do not fit {len(x)} rows of {len(books)} stages")
    books = np.ascontiguousarray(books, dtype=np.float32)
    norms = codebook_norms(books) if norms is None else norms
    codes = np.empty((len(x), len(books)), np.uint8)
    if taken:
        codes[:, :taken] = first

    def encode(i: int) -> None:
        rows = slice(i, i + _ENCODE_BLOCK)
        residual = x[rows].copy()
        for m, book in enumerate(books):
            if m < taken:
                residual -= book[codes[rows, m]]
                continue
            distances = residual @ book.T
            distances *= -2
            distances += norms[m]
            nearest = distances.argmin(axis=1)
            codes[rows, m] = nearest
            residual -= book[nearest]

    for _ in _by_blocks(encode, len(x), block=_ENCODE_BLOCK):
        pass
    return codes

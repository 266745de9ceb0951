"""Training a codec's faiss index on a sample (`train_index`): seeded k-means, the binary
codecs' thresholds and scales, PQ sub-quantizers trained side by side, residual quantizers
stage by stage (`residual`; on a GPU with its flat indexes assigning), each step heard of,
and faiss's GPU k-means assignment and ICM encoder where faiss sees a GPU (released afterwards:
a plain CPU codec). A training faiss runs in one call (LSQ; on a GPU, a PQ) is heard of
through faiss's verbose lines (`_faiss_progress`)."""

from __future__ import annotations

import contextlib
import functools
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from vecpress.kernels._faiss import faiss, num_gpus
from vecpress.kernels.codecs.build import _innermost, _min_train, build_index
from vecpress.kernels.codecs.residual import first_stages, residual_quantizers, train_stagewise, trains_stagewise
from vecpress.kernels.codecs.spec import CodecSpecError, parse_spec
from vecpress.kernels.knn import prepare_vectors


@dataclass(frozen=True)
class Iterations:
    """A k-means schedule shorter than the usual one, for a codec trained to be judged, not
    kept (the advisor's: pipeline.sweep.JUDGING). `pq`: a PQ's (plain or fast-scan)
    sub-quantizers', instead of faiss's 25. `rq_last`: the last step of a residual quantizer's
    per-stage progressive k-means (all the dims), instead of RQ_PROGRESSIVE's 5; `rq_steps`:
    that k-means' steps (on the first d^(i/steps) principal axes, step i), instead of
    RQ_PROGRESSIVE's 4; both where that schedule is the one used (the rows enough for it)."""
    pq: int | None = None
    rq_last: int | None = None
    rq_steps: int | None = None


def train_index(xt: np.ndarray, spec: str, metric: str, *, seed: int, ngpu: int, progress=None, start=None,
                iterations: Iterations | None = None):
    """The faiss index of `spec` trained on `xt` (raw vectors; normalised here for cosine):
    what Codec.train wraps. Deterministic for a given seed and sample. Uses faiss's GPU
    k-means assignment when faiss sees a GPU (`ngpu`: -1 = all it sees, 0 = none), and the
    GPU's flat search for a residual quantizer's stages and an LSQ's encoding in training.

    `start`: the trained index of a codec whose training is the first stages of this one's
    (kernels.codecs.nested: a shorter RQ of the family, trained on the same `xt` and seed).
    Where this one trains stage by stage, those stages are taken from it and only the others
    trained; the result is the same codec.

    `iterations`: a shorter k-means schedule, for a codec trained to be judged, not kept."""
    iterations = iterations or Iterations()
    dim = xt.shape[1]
    index = build_index(spec, dim, metric)
    chain, inner = _innermost(index)
    residual = residual_quantizers(inner)
    beams = [int(q.max_beam_size) for q in residual]
    rq_last = None
    if residual:  # (before any copy of xt: its rows past the cap are never used)
        xt = _residual_training(residual, xt, seed)
        if all((int(q.cp.progressive_dim_steps), int(q.cp.niter)) == RQ_PROGRESSIVE for q in residual):
            rq_last = iterations.rq_last  # (measured with that schedule only)
            if iterations.rq_steps is not None:  # (cp is not in the codec's bytes)
                for q in residual:
                    q.cp.progressive_dim_steps = iterations.rq_steps
    xt = prepare_vectors(xt, metric)
    if not np.isfinite(xt).all():
        raise ValueError("training vectors contain NaN or Inf")
    need = _min_train(chain, inner)
    if xt.shape[0] < need:
        raise CodecSpecError(f"codec {spec!r} needs at least {need} training vectors, got {xt.shape[0]}")
    if isinstance(inner, faiss.IndexLSH):
        _train_binary(index, chain, inner, xt, binary=parse_spec(spec, dim).binary)
        return index
    keep_alive = _configure_training(chain, inner, seed=seed, ngpu=ngpu, pq_iterations=iterations.pq)
    if keep_alive is None and _trains_pq_in_parallel(inner):
        _train_pq_in_parallel(index, chain, inner, xt, progress)
    elif trains_stagewise(inner):  # each stage heard of (progress)
        first = None if start is None else first_stages(start, inner)
        gpu_flat = None if keep_alive is None else functools.partial(faiss.GpuIndexFlatL2, keep_alive[0])
        train_stagewise(inner, _train_chain(chain, xt), progress, first, gpu_flat, last_iterations=rq_last)
        _mark_trained(index)
    else:
        with _faiss_progress(inner, progress):  # (LSQ; on a GPU, a PQ's sub-quantizers)
            index.train(xt)
    for q, beam in zip(residual, beams):  # the spec's beam again, for encoding
        q.max_beam_size = beam
    _release_gpu(inner)
    del keep_alive
    if parse_spec(spec, dim).sq_type and parse_spec(spec, dim).sq_type.endswith("_eden"):
        _scale_eden(chain, inner, xt)
    return index


#: a CPU residual quantizer's per-stage k-means when it has at least faiss's minimum of points
#: per centroid (39 x 2^nbits): progressive-dimension k-means in 4 steps of 5 iterations (faiss's
#: default: 10 steps of 10, kept with fewer rows). Measured (BENCHMARKS.md, "Residual quantizer
#: training"), RQ16x8: on 65,536 x 768-d 2.0x faster, recall@10 0.832 against 0.817; on 30,000 x
#: 384-d 2.8x faster, 0.686 against 0.695 (2 steps: 0.679, 1 step and 10 iterations: lower
#: again); on 4,800 SIFT rows (19 per centroid) 2 steps cost 0.02, hence the minimum
RQ_PROGRESSIVE = (4, 5)


def _residual_training(quantizers: list, xt: np.ndarray, seed: int) -> np.ndarray:
    """Residual quantizers trained greedily (beam 1; the caller restores the spec's
    beam for encoding), on at most the rows one stage's k-means samples anyway (faiss's
    max_points_per_centroid x 2^nbits: 65,536 for 8 bits; a seeded subsample), with the
    per-stage k-means RQ_PROGRESSIVE where there are rows enough. Each stage encodes every
    training row, so rows past the cap only cost time, and a wider beam memory (rows x beam x
    dim floats). Measured (BENCHMARKS.md, "Residual quantizer training"): RQ16x8 on 300k x
    768-d, 2 cores: 19x faster than faiss's default, recall@10 0.832 against 0.822, under 2 GB
    instead of 14.9 GB (45x, 0.826 and 1.6 GB since, with residual.progressive_kmeans)."""
    ksubs = [1 << int(faiss.vector_to_array(q.nbits).max()) for q in quantizers]
    cap = max(int(q.cp.max_points_per_centroid) * k for q, k in zip(quantizers, ksubs))
    for q, k in zip(quantizers, ksubs):
        q.max_beam_size = 1
        if min(len(xt), cap) >= int(q.cp.min_points_per_centroid) * k:
            q.cp.progressive_dim_steps, q.cp.niter = RQ_PROGRESSIVE
    if len(xt) <= cap:
        return xt
    return xt[np.sort(np.random.default_rng(seed).choice(len(xt), cap, replace=False))]


def _scale_eden(chain, inner, xt: np.ndarray) -> None:
    """faiss 1.15's EDEN levels are fixed for coordinates of unit variance (Lloyd-Max for a
    standard normal), so its error depends on the data's scale (unit vectors at 2 bits:
    8x their own energy). Scaled by the training data's RMS coordinate, as it reaches the
    quantizer, the codec is scale-invariant (SIFT, unit vectors and Gaussians alike: relative
    error 0.11-0.15 at 2 bits, 0.009-0.011 at 4)."""
    x = xt
    for vt in chain:
        x = vt.apply(x)
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    levels = faiss.vector_to_array(inner.sq.trained) * (rms if rms > 0 else 1.0)
    faiss.copy_array_to_vector(levels.astype(np.float32), inner.sq.trained)


def _pretransform_levels(index) -> list:
    levels = []
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        levels.append(index)
        index = faiss.downcast_index(index.index)
    return levels


def _mark_trained(index) -> None:
    """The pre-transform levels around a codec trained piece by piece marked trained, as
    IndexPreTransform.train leaves them."""
    for level in _pretransform_levels(index):
        level.is_trained = True


def _train_chain(chain, x: np.ndarray, progress=None) -> np.ndarray:
    """Train the untrained transforms of `chain` in order, each on the previous one's output,
    as IndexPreTransform.train does; returns `x` through all of them. `progress(done, total)`
    hears of each OPQ rotation iteration (`total`: opq_steps(chain))."""
    done, total = 0, opq_steps(chain)
    for vt in chain:
        if not vt.is_trained and _trains_opq_stepwise(vt):
            _train_opq(vt, x, None if progress is None else lambda i, _: progress(done + i, total))
            done += int(vt.niter)
        elif not vt.is_trained:
            vt.train(x)
        x = vt.apply(x)
    return x


def opq_steps(chain) -> int:
    """The OPQ rotation iterations `_train_chain` reports for `chain`."""
    return sum(int(vt.niter) for vt in chain if not vt.is_trained and _trains_opq_stepwise(vt))


def _trains_opq_stepwise(vt) -> bool:
    return isinstance(vt, faiss.OPQMatrix) and vt.pq is None and int(vt.d_out) <= int(vt.d_in) and int(vt.niter) > 0


def _train_opq(opq, x: np.ndarray, progress=None) -> None:
    """faiss's OPQMatrix.train, one rotation iteration per call, so that each is heard of: the
    same rotation, byte for byte (tests/kernels/test_codecs.py). faiss's train keeps across
    calls what its iterations keep (the rotation `A`; the product quantizer it alternates
    with, when given as `pq`) and resamples the same rows (a fixed seed); only the first
    iteration's PQ k-means runs `niter_pq_0` iterations, the others `niter_pq` from the last
    centroids. 50 iterations by default: minutes at 384-d on 2 cores, formerly in silence."""
    niter, niter_pq_0 = int(opq.niter), int(opq.niter_pq_0)
    pq = faiss.ProductQuantizer(int(opq.d_out), int(opq.M), 8)  # (what faiss's train makes for itself)
    opq.pq, opq.niter = pq, 1
    x = np.ascontiguousarray(x, dtype=np.float32)  # (once, not per call)
    try:
        for i in range(niter):
            opq.train(x)
            opq.niter_pq_0 = opq.niter_pq  # (later iterations: hot-started PQ, niter_pq)
            if progress is not None:
                progress(i + 1, niter)
    finally:
        opq.pq, opq.niter, opq.niter_pq_0 = None, niter, niter_pq_0


#: rows a block when summing a binary codec's scales (float64 sums of float32 rows)
_BINARY_BLOCK = 8192


def _train_binary(index, chain, lsh, xt: np.ndarray, *, binary: str | None) -> None:
    """Train the transforms before the sign step, then set thresholds t (0 for BIN, the
    per-dimension median for BINt) and scales s = mean |x - t| (the best reconstruction
    t + s * sign(x - t) in the least-squares sense), summed in float64 a block of rows at a
    time: no float64 copy of the sample (at 100,000 x 384-d two such copies were 600 MB and
    most of the 7.6 s BIN took to train here, against 0.04 s on 10,000 rows)."""
    x = np.ascontiguousarray(_train_chain(chain[:-1], xt), dtype=np.float32)
    t = np.median(x, axis=0).astype(np.float64) if binary == "BINt" else np.zeros(x.shape[1])
    s = np.zeros(x.shape[1])
    for i in range(0, len(x), _BINARY_BLOCK):
        s += np.abs(x[i:i + _BINARY_BLOCK] - t).sum(axis=0)
    s /= max(len(x), 1)
    s = np.where(s > 1e-12, s, 1.0)
    scaling = chain[-1]
    faiss.copy_array_to_vector(np.diag(1.0 / s).astype(np.float32).ravel(), scaling.A)
    faiss.copy_array_to_vector((-t / s).astype(np.float32), scaling.b)
    scaling.is_trained = True
    _mark_trained(index)


def _trains_pq_in_parallel(inner) -> bool:
    """A plain or fast-scan PQ with faiss's default training: its sub-quantizers' k-means are
    independent, so _train_pq_in_parallel can run them side by side."""
    return isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)) and not inner.is_trained \
        and int(inner.pq.train_type) == faiss.ProductQuantizer.Train_default and int(inner.pq.M) > 1


def _train_pq_in_parallel(index, chain, inner, xt: np.ndarray, progress=None) -> None:
    """Train the pre-transforms as faiss does (IndexPreTransform.train), then the PQ's M
    sub-quantizers side by side, one k-means per CPU thread, each on one thread.

    faiss's ProductQuantizer.train runs them one after another, each on every thread. A PQ
    k-means is small (2^nbits centroids in dsub dimensions) and uses threads poorly: the
    assignment is a GEMM with dsub-deep products. The centroids are the same, byte for byte:
    faiss seeds every sub-quantizer's k-means with the same ClusteringParameters, and k-means
    gives the same result on any number of threads (tests/kernels/test_codecs.py compares the trained
    bytes). Measured (benchmarks/train.py): PQ48 on 50k x 384-d, 4.70 s -> 2.54 s on 2 cores.
    An OPQ rotation in front reports its iterations first, in the same count."""
    pq = inner.pq
    M, dsub, ksub = int(pq.M), int(pq.dsub), int(pq.ksub)
    before = opq_steps(chain)
    x = _train_chain(chain, xt, None if progress is None else lambda done, _: progress(done, before + M))
    x = np.ascontiguousarray(x, dtype=np.float32)

    def sub_quantizer(m: int) -> np.ndarray:
        faiss.omp_set_num_threads(1)  # this thread's OpenMP regions only
        clustering = faiss.Clustering(dsub, ksub, pq.cp)
        clustering.train(np.ascontiguousarray(x[:, m * dsub:(m + 1) * dsub]), faiss.IndexFlatL2(dsub))
        return faiss.vector_to_array(clustering.centroids)

    with ThreadPoolExecutor(max(1, min(M, faiss.omp_get_max_threads()))) as pool:
        futures = [pool.submit(sub_quantizer, m) for m in range(M)]
        for done, _ in enumerate(as_completed(futures), 1):
            if progress is not None:
                progress(before + done, before + M)
        centroids = [f.result() for f in futures]
    faiss.copy_array_to_vector(np.concatenate(centroids).astype(np.float32), pq.centroids)
    inner.is_trained = True
    _mark_trained(index)


def _configure_training(chain, inner, *, seed: int, ngpu: int, pq_iterations: int | None = None):
    """Seed every k-means the codec runs (and set a PQ's iterations, where given); route
    k-means assignment to the GPU if present."""
    if isinstance(inner, faiss.IndexPQ):
        inner.do_polysemous_training = False  # 6-8x slower training, no benefit for codes
    if isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        inner.pq.cp.seed = seed
        if pq_iterations is not None:
            inner.pq.cp.niter = pq_iterations
    for q in (getattr(inner, "rq", None), getattr(inner, "lsq", None)):
        if q is not None and hasattr(q, "cp"):
            q.cp.seed = seed
    if isinstance(inner, faiss.IndexLocalSearchQuantizer):
        inner.lsq.random_seed = seed
    for name in ("prq", "plsq"):
        paq = getattr(inner, name, None)
        if paq is None:
            continue
        for i in range(paq.nsplits):
            sub = faiss.downcast_AdditiveQuantizer(paq.subquantizer(i))
            if hasattr(sub, "cp"):
                sub.cp.seed = seed + i
            if hasattr(sub, "random_seed"):
                sub.random_seed = seed + i
    # OPQ's rotation and inner k-means use faiss's fixed internal seeds: deterministic as is
    if num_gpus(ngpu) == 0:
        return None
    res = faiss.StandardGpuResources()  # (first: the caller's GPU flat indexes are made on it)
    if isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        inner.pq.assign_index = faiss.GpuIndexFlatL2(res, inner.pq.dsub)
        return res, inner.pq.assign_index
    if isinstance(inner, faiss.IndexResidualQuantizer) and not trains_stagewise(inner) and \
            hasattr(faiss, "GpuProgressiveDimIndexFactory"):  # (e.g. codebook refinement: faiss trains it)
        factory = faiss.GpuProgressiveDimIndexFactory(num_gpus(ngpu))
        inner.rq.assign_index_factory = factory
        return res, factory
    lsqs = _local_search_quantizers(inner)
    if lsqs and hasattr(faiss, "GpuIcmEncoderFactory"):
        factory = faiss.GpuIcmEncoderFactory(num_gpus(ngpu))  # (an LSQ's encoding in training: ICM)
        for lsq in lsqs:
            lsq.icm_encoder_factory = factory
        return res, factory
    return (res,)


def _local_search_quantizers(inner) -> list:
    """The local search quantizers a codec trains: an LSQ's, or each of a PLSQ's."""
    if isinstance(inner, faiss.IndexLocalSearchQuantizer):
        return [inner.lsq]
    if isinstance(inner, faiss.IndexProductLocalSearchQuantizer):
        return [faiss.downcast_AdditiveQuantizer(inner.plsq.subquantizer(i)) for i in range(inner.plsq.nsplits)]
    return []


def _release_gpu(inner) -> None:
    """Drop GPU helpers so the trained index serialises and encodes as a plain CPU codec."""
    if isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        inner.pq.assign_index = None
    if isinstance(inner, faiss.IndexResidualQuantizer) and hasattr(inner.rq, "assign_index_factory"):
        inner.rq.assign_index_factory = None
    for lsq in _local_search_quantizers(inner):
        lsq.icm_encoder_factory = None


#: the line faiss prints, when verbose, as each step of its own training loop ends: an LSQ's
#: iterations, an RQ's stages, a PQ's sub-quantizers (the last two: when faiss trains them, on a GPU)
_STEP_LINES = {"lsq": re.compile(r"^iter \d+:$"), "rq": re.compile(r"\] train stage \d+, "),
               "pq": re.compile(r"^Training PQ slice \d+/\d+")}
#: faiss's other verbose lines there (objectives, timings, its k-means's iterations)
FAISS_CHATTER = re.compile(r"^(\r?\t|Training |Before training: obj|After training: obj|Time statistic:|"
                           r"Clustering \d+ points|  Preprocessing in|  Iteration \d+|Sampling a subset)")


def _faiss_steps(inner) -> tuple[list, re.Pattern, int] | None:
    """(the quantizers to make verbose, their step line, how many steps) of a training faiss
    runs in one call, or None where it prints no step lines."""
    if isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        return [inner.pq], _STEP_LINES["pq"], int(inner.pq.M)
    if rqs := residual_quantizers(inner):
        return rqs, _STEP_LINES["rq"], sum(int(q.M) for q in rqs)
    if lsqs := _local_search_quantizers(inner):
        return lsqs, _STEP_LINES["lsq"], sum(int(q.train_iters) for q in lsqs)
    return None


@contextlib.contextmanager
def _faiss_progress(inner, progress):
    """A training faiss runs in one call heard of step by step where `progress` reads faiss's
    verbose lines (`progress.faiss_lines(step, chatter, total)`, a context that yields whether
    it does: pipeline.heartbeat): faiss's verbose output on for as long as it is read."""
    found = _faiss_steps(inner)
    lines = getattr(progress, "faiss_lines", None)
    if found is None or lines is None:
        yield
        return
    quantizers, step, total = found
    with lines(step, FAISS_CHATTER, total) as reading:
        for q in quantizers:
            q.verbose = reading
        try:
            yield
        finally:
            for q in quantizers:
                q.verbose = False

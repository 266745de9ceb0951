"""GPU encoders (CuPy): product quantizers through a fused distance + arg-min CUDA kernel,
scalar quantizers and binary sign codes through element-wise kernels, with the codec's
pre-transforms (cosine normalisation, OPQ/PCA/random rotations, Matryoshka prefixes) applied
on the GPU too. Host rows travel through pinned, double-buffered transfers overlapped with
compute.

Why a kernel of its own: faiss has no GPU path for standalone encoding (`sa_encode`, faiss
issue #3038), and a batched GEMM + argmin (benchmarks/torch_pq.py, the naive baseline) writes and re-reads
an n x M x 2^nbits distance tensor. Here one thread owns one (row, sub-quantizer) pair: it
keeps its dsub floats in registers, walks the 2^nbits centroids of that sub-quantizer from
shared memory (one load serves the whole warp), and keeps only the running minimum. Nothing
but the input and the codes touches device memory.

Distances are sum((x_j - c_kj)^2) in float32 with the first minimum winning, as faiss's
`fvec_L2sqr_ny_nearest` computes them for dsub < 16 (faiss uses ||c||^2 - 2 x.c through BLAS
above): codes equal faiss CPU's for all but near-tied sub-vectors (tests/kernels/test_gpu_encode.py,
on a GPU machine). Scalar and binary codes follow faiss's formulas exactly; `sq_codes` and
`sign_codes` take the array module (numpy or cupy) as an argument, so the CPU tests check the
same function against faiss that the GPU runs.

CuPy is imported only when a GPU encoder is built: it is an optional dependency of GPU
machines (`vecpress[gpu]`), never of kernels' import.

Staging: `encode(x)` takes a host array. When `x` is pinned (cupyx.empty_pinned) each block
is copied to the GPU straight from it; otherwise `staging_threads` threads copy each block
into one of two pinned buffers while the previous block is on the wire or in the kernel.
Codes come back through two pinned output buffers. Events order every buffer's reuse.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from vecpress.kernels._faiss import faiss
from vecpress.kernels.pq_encode import encode_pq, optional_module, pack_bits, pack_codes

#: bytes of float32 rows per block of the host pipeline: large enough that per-block Python and
#: launch overheads stay small next to the copy (64 MiB: 43,690 rows at d = 384, 21,845 at 768)
DEFAULT_BLOCK_BYTES = 64 << 20

_PQ_SOURCE = r"""
// One thread = one (row, sub-quantizer m). Block: THREADS rows of one m. DSUB, KSUB: -D.
extern "C" __global__ void __launch_bounds__(THREADS)
pq_assign(const float* __restrict__ x, const float* __restrict__ centroids,
          unsigned char* __restrict__ out, long long n, int d, int M) {
    extern __shared__ float4 shared4[];
    float* sc = reinterpret_cast<float*>(shared4);
    const int m = blockIdx.y;
    const float* c = centroids + (size_t)m * KSUB * DSUB;
    for (int i = threadIdx.x; i < KSUB * DSUB; i += blockDim.x) sc[i] = c[i];
    __syncthreads();
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n) return;
    const float* xr = x + row * d + (size_t)m * DSUB;
    float xs[DSUB];
#if DSUB % 4 == 0
    if ((reinterpret_cast<size_t>(xr) & 15) == 0) {
#pragma unroll
        for (int j = 0; j < DSUB; j += 4) {
            float4 v = *reinterpret_cast<const float4*>(xr + j);
            xs[j] = v.x; xs[j + 1] = v.y; xs[j + 2] = v.z; xs[j + 3] = v.w;
        }
    } else
#endif
    {
#pragma unroll
        for (int j = 0; j < DSUB; j++) xs[j] = xr[j];
    }
    float best = 3.402823466e+38f;
    int best_k = 0;
    for (int k = 0; k < KSUB; k++) {
        const float* ck = sc + k * DSUB;
        float acc = 0.f;
#if DSUB % 4 == 0
#pragma unroll
        for (int j = 0; j < DSUB; j += 4) {
            float4 cv = *reinterpret_cast<const float4*>(ck + j);
            float t0 = xs[j] - cv.x, t1 = xs[j + 1] - cv.y, t2 = xs[j + 2] - cv.z, t3 = xs[j + 3] - cv.w;
            acc = fmaf(t0, t0, acc); acc = fmaf(t1, t1, acc);
            acc = fmaf(t2, t2, acc); acc = fmaf(t3, t3, acc);
        }
#else
#pragma unroll
        for (int j = 0; j < DSUB; j++) { float t = xs[j] - ck[j]; acc = fmaf(t, t, acc); }
#endif
        if (acc < best) { best = acc; best_k = k; }  // strict: the first minimum wins, as in faiss
    }
    out[row * M + m] = (unsigned char)best_k;
}
"""

_THREADS = 128
_kernels: dict = {}


def cupy_module():
    """CuPy, or ImportError saying how to get it (GPU machines only)."""
    return optional_module("cupy", "the GPU encoder needs CuPy: install `vecpress[gpu]` (or cupy-cuda12x / "
                                   "cupy-cuda13x to match the machine's CUDA)")


def gpu_count() -> int:
    """CUDA devices CuPy can use here; 0 without CuPy, a driver or a GPU."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # ImportError, CUDARuntimeError (no driver / no device)
        return 0


def _pq_kernel(cp, dsub: int, ksub: int):
    key = (cp.cuda.runtime.getDevice(), dsub, ksub)
    if key not in _kernels:
        kernel = cp.RawKernel(_PQ_SOURCE, "pq_assign",
                              options=(f"-DDSUB={dsub}", f"-DKSUB={ksub}", f"-DTHREADS={_THREADS}", "-std=c++17"))
        shared = ksub * dsub * 4
        if shared > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = shared
        _kernels[key] = kernel
    return _kernels[key]


# ---- array-module-generic codecs (numpy for the CPU tests, cupy on the GPU) -------------------

def sign_codes(xp, x):
    """faiss IndexLSH codes without rotation or thresholds: bit = x >= 0."""
    return pack_bits(xp, (x >= 0).astype(xp.uint8), x.shape[1])


#: faiss ScalarQuantizer types encoded here, and their codes' levels (None: float formats)
SQ_TYPES = {"QT_8bit": 255, "QT_8bit_uniform": 255, "QT_4bit": 15, "QT_4bit_uniform": 15, "QT_fp16": None}


def sq_codes(xp, x, qtype: str, trained):
    """faiss ScalarQuantizer codes: x -> (x - vmin) / vdiff clipped to [0, 1] (0 where vdiff is 0),
    then int(255 x) per byte (8 bit; float32 product) or int(15.0 x) per nibble (4 bit; double
    product, low nibble first), or IEEE half (fp16). `trained` is sq.trained: [vmin, vdiff]
    (uniform) or [vmin_0..vmin_d-1, vdiff_0..vdiff_d-1]."""
    n, d = x.shape
    if qtype == "QT_fp16":
        return xp.ascontiguousarray(x.astype(xp.float16)).view(xp.uint8).reshape(n, 2 * d)
    levels = SQ_TYPES[qtype]
    trained = xp.asarray(trained, dtype=xp.float32)
    vmin, vdiff = (trained[0], trained[1]) if qtype.endswith("uniform") else (trained[:d], trained[d:])
    safe = xp.where(vdiff != 0, vdiff, xp.float32(1))
    xi = xp.clip((x - vmin) / safe, xp.float32(0), xp.float32(1))
    xi = xp.where(vdiff != 0, xi, xp.float32(0)).astype(xp.float32)
    if levels == 255:
        return (xi * xp.float32(255)).astype(xp.uint8)
    q = (xi.astype(xp.float64) * 15.0).astype(xp.uint8)
    if d % 2:
        q = xp.concatenate([q, xp.zeros((n, 1), xp.uint8)], axis=1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(xp.uint8)


# ---- the codec, as steps on the GPU ------------------------------------------------------------

@dataclass
class GpuPlan:
    """A faiss codec as GPU steps: the pre-transforms, then the quantizer. Built on the CPU
    (`plan_codec`), moved to a device by GpuEncoder."""

    kind: str  # "pq" | "sq" | "sign"
    code_size: int
    normalize_input: bool
    steps: list = field(default_factory=list)  # ("normalize",) ("linear", A, b) ("scale", s, b) ("remap[_pad]", idx)
    centroids: np.ndarray | None = None
    nbits: int = 8
    qtype: str | None = None
    trained: np.ndarray | None = None


def plan_codec(index, metric: str) -> GpuPlan | None:
    """The GPU plan of a trained faiss codec, or None when some part of it has no GPU path here
    (additive quantizers, RaBitQ, 6-bit/bf16 scalar types, nbits > 8, unknown transforms):
    such codecs encode with faiss on the CPU."""
    inner = faiss.downcast_index(index)
    steps: list = []
    while isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            step = _transform_step(faiss.downcast_VectorTransform(inner.chain.at(i)))
            if step is None:
                return None
            steps.append(step)
        inner = faiss.downcast_index(inner.index)
    normalize = metric == "cosine"
    code_size = int(index.sa_code_size())
    if isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        pq = inner.pq
        if int(pq.nbits) > 8:
            return None
        cent = faiss.vector_to_array(pq.centroids).reshape(int(pq.M), int(pq.ksub), int(pq.dsub))
        if int(pq.ksub) * int(pq.dsub) * 4 > 200 * 1024:  # the codebook of one m must fit in shared memory
            return None
        return GpuPlan("pq", code_size, normalize, steps, centroids=np.ascontiguousarray(cent, np.float32),
                       nbits=int(pq.nbits))
    if isinstance(inner, faiss.IndexScalarQuantizer):
        names = {getattr(faiss.ScalarQuantizer, q): q for q in SQ_TYPES}
        qtype = names.get(int(inner.sq.qtype))
        if qtype is None:
            return None
        return GpuPlan("sq", code_size, normalize, steps, qtype=qtype,
                       trained=faiss.vector_to_array(inner.sq.trained).astype(np.float32))
    if isinstance(inner, faiss.IndexLSH):
        if inner.rotate_data or inner.train_thresholds or int(inner.nbits) != int(inner.d):
            return None
        return GpuPlan("sign", code_size, normalize, steps)
    return None


def _transform_step(vt):
    if isinstance(vt, faiss.RemapDimensionsTransform):
        idx = faiss.vector_to_array(vt.map).astype(np.int64)
        # dims mapped from -1 are zero; decided here, not per block (a device sync)
        return ("remap", idx) if (idx >= 0).all() else ("remap_pad", idx)
    if isinstance(vt, faiss.NormalizationTransform):
        return ("normalize",) if float(vt.norm) == 2.0 else None
    if isinstance(vt, faiss.LinearTransform):
        A = faiss.vector_to_array(vt.A).reshape(int(vt.d_out), int(vt.d_in)).astype(np.float32)
        b = faiss.vector_to_array(vt.b).astype(np.float32) if vt.have_bias else np.zeros(int(vt.d_out), np.float32)
        if A.shape[0] == A.shape[1] and not np.count_nonzero(A - np.diag(np.diag(A))):
            return ("scale", np.ascontiguousarray(np.diag(A)), b)  # y = x * s + b, elementwise
        return ("linear", A, b)
    return None


def run_plan(xp, plan: GpuPlan, x, *, steps=None, trained=None, pq=None):
    """A plan's codes with array module `xp`: pre-transforms, then the quantizer. On the GPU
    (cupy) `pq` is the fused kernel; with numpy (the CPU check of a plan) it defaults to
    kernels.pq_encode's reference."""
    if plan.normalize_input:
        x = _normalize(xp, x)
    for step in plan.steps if steps is None else steps:
        x = _apply_step(xp, step, x)
    if plan.kind == "sign":
        return sign_codes(xp, x)
    if plan.kind == "sq":
        return sq_codes(xp, x, plan.qtype, plan.trained if trained is None else trained)
    if pq is None:
        return encode_pq(np.ascontiguousarray(x, np.float32), plan.centroids, plan.nbits)
    return pq(x)


class GpuEncoder:
    """Encodes host float32 rows on one GPU with a codec's GpuPlan.

    `encode(x)` -> host codes, pipelined as the module docstring says; `encode_device(xd)`
    -> device codes from rows already on the device (benchmarks, fused pipelines).
    """

    def __init__(self, plan: GpuPlan, *, device_id: int = 0, block_rows: int | None = None,
                 staging_threads: int | None = None):
        self.cp = cp = cupy_module()
        self.plan = plan
        self.device_id = device_id
        self.block_rows = block_rows
        self.staging_threads = staging_threads or max(1, min(8, faiss.omp_get_max_threads() // 2))
        self._pool = ThreadPoolExecutor(self.staging_threads) if self.staging_threads > 1 else None
        with cp.cuda.Device(device_id):
            self.steps = [self._to_device(s) for s in plan.steps]
            if plan.kind == "pq":
                self.centroids = cp.asarray(plan.centroids)
                M, ksub, dsub = plan.centroids.shape
                self.kernel = _pq_kernel(cp, dsub, ksub)
            if plan.kind == "sq":
                self.trained = cp.asarray(plan.trained)
            self.copy_stream = cp.cuda.Stream(non_blocking=True)
            self.compute_stream = cp.cuda.Stream(non_blocking=True)
        self._buffers: dict = {}

    @classmethod
    def for_codec(cls, index, metric: str, **kwargs) -> "GpuEncoder | None":
        plan = plan_codec(index, metric)
        return None if plan is None else cls(plan, **kwargs)

    def _to_device(self, step):
        return (step[0], *(self.cp.asarray(a) for a in step[1:]))

    @property
    def device_name(self) -> str:
        props = self.cp.cuda.runtime.getDeviceProperties(self.device_id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    # ---- on the device -------------------------------------------------------------------
    def encode_device(self, x):
        """(n, d) float32 cupy array on this device -> (n, code_size) uint8 cupy array, on the
        current stream."""
        return run_plan(self.cp, self.plan, x, steps=self.steps, trained=getattr(self, "trained", None),
                        pq=self._pq)

    def _pq(self, x):
        cp = self.cp
        M, ksub, dsub = self.plan.centroids.shape
        n, d = x.shape
        if d != M * dsub:
            raise ValueError(f"vectors have {d} dims after the pre-transforms, the PQ expects {M * dsub}")
        x = cp.ascontiguousarray(x, dtype=cp.float32)
        assign = cp.empty((n, M), cp.uint8)
        if n:
            grid = ((n + _THREADS - 1) // _THREADS, M)
            self.kernel(grid, (_THREADS,), (x, self.centroids, assign, np.int64(n), np.int32(d), np.int32(M)),
                        shared_mem=ksub * dsub * 4)
        return pack_codes(assign, self.plan.nbits, xp=cp)

    # ---- from the host -------------------------------------------------------------------
    def _slots(self, rows: int, d: int):
        import cupyx

        cp = self.cp
        key = (rows, d)
        if key not in self._buffers:
            self._buffers = {}  # one size at a time: drop the old pinned and device buffers
            self._buffers[key] = [{
                "host_in": cupyx.empty_pinned((rows, d), np.float32),
                "dev_in": cp.empty((rows, d), cp.float32),
                "host_out": cupyx.empty_pinned((rows, self.plan.code_size), np.uint8),
                "copied": cp.cuda.Event(), "consumed": cp.cuda.Event(), "returned": cp.cuda.Event(),
                "pending": None, "used": False,
            } for _ in range(2)]
        return self._buffers[key]

    def _stage(self, dst: np.ndarray, src: np.ndarray) -> None:
        """pageable -> pinned, split over the staging threads (numpy copies release the GIL)."""
        n = src.shape[0]
        if self._pool is None or n < 4 * self.staging_threads:
            np.copyto(dst, src)
            return
        step = (n + self.staging_threads - 1) // self.staging_threads
        list(self._pool.map(lambda lo: np.copyto(dst[lo:lo + step], src[lo:lo + step]), range(0, n, step)))

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, d) host float32 -> (n, code_size) uint8 host codes."""
        cp = self.cp
        x = np.asarray(x)
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        n, d = x.shape
        out = np.empty((n, self.plan.code_size), np.uint8)
        if n == 0:
            return out
        rows = min(self.block_rows or max(1024, DEFAULT_BLOCK_BYTES // (4 * d)), n)
        direct = _is_pinned(cp, x)
        with cp.cuda.Device(self.device_id):
            slots = self._slots(rows, d)

            def drain(slot):
                if slot["pending"] is not None:
                    lo, hi = slot["pending"]
                    slot["returned"].synchronize()
                    out[lo:hi] = slot["host_out"][: hi - lo]
                    slot["pending"] = None

            for i, lo in enumerate(range(0, n, rows)):
                hi = min(n, lo + rows)
                b = hi - lo
                slot = slots[i % 2]
                drain(slot)
                if slot["used"]:
                    slot["copied"].synchronize()  # its last H2D has left host_in
                src = x[lo:hi]
                if not direct:
                    self._stage(slot["host_in"][:b], src)
                    src = slot["host_in"][:b]
                self.copy_stream.wait_event(slot["consumed"])  # the kernel has finished reading dev_in
                slot["dev_in"][:b].set(src, stream=self.copy_stream)
                slot["copied"].record(self.copy_stream)
                self.compute_stream.wait_event(slot["copied"])
                with self.compute_stream:
                    codes = self.encode_device(slot["dev_in"][:b])
                    slot["consumed"].record(self.compute_stream)
                    _get_async(codes, slot["host_out"][:b], self.compute_stream)
                    slot["returned"].record(self.compute_stream)
                slot["used"] = True
                slot["pending"] = (lo, hi)
            for slot in slots:
                drain(slot)
            self.compute_stream.synchronize()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._buffers = {}


def _get_async(codes, out: np.ndarray, stream) -> None:
    """Device -> pinned host copy queued on `stream` (CuPy >= 13 waits for it unless
    blocking=False)."""
    try:
        codes.get(stream=stream, out=out, blocking=False)
    except TypeError:  # older CuPy: get() is asynchronous into pinned memory
        codes.get(stream=stream, out=out)


def _is_pinned(cp, x: np.ndarray) -> bool:
    try:
        attrs = cp.cuda.runtime.pointerGetAttributes(x.ctypes.data)
        return int(attrs.type) == cp.cuda.runtime.memoryTypeHost
    except Exception:
        return False


def _normalize(cp, x, *, reciprocal: bool = False):
    """Rows scaled to unit L2 norm, zero rows left alone: x / ||x|| as prepare_vectors does, or
    x * (1 / ||x||) as faiss's NormalizationTransform does (`reciprocal`)."""
    sq = (x * x).sum(axis=1, keepdims=True)
    norms = cp.sqrt(cp.where(sq > 0, sq, cp.float32(1))).astype(cp.float32)
    if reciprocal:
        return x * (cp.float32(1) / norms)
    return x / norms


def _apply_step(cp, step, x):
    kind = step[0]
    if kind == "normalize":
        return _normalize(cp, x, reciprocal=True)
    if kind == "remap":
        return x[:, step[1]]
    if kind == "remap_pad":
        idx = step[1]
        return cp.where(idx >= 0, x[:, cp.maximum(idx, 0)], cp.float32(0))
    if kind == "scale":
        return x * step[1] + step[2]
    A, b = step[1], step[2]
    return x @ A.T + b

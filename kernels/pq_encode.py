"""Blocked product-quantizer encoding outside faiss: a numpy reference and an optional torch
path (CPU or CUDA) that give faiss's PQ codes, byte for byte, up to ties and float rounding.

For each sub-quantizer m the nearest centroid of a sub-vector x_m is

    argmin_k ||x_m - c_mk||^2 = argmin_k (||c_mk||^2 - 2 x_m . c_mk)

(||x_m||^2 is the same for every k, so it is left out: one rounding fewer). Rows are taken a
block at a time, so the distances held at once are block_rows x M x 2^nbits floats, never
n x M x 2^nbits: `block_rows` bounds the working memory, not n.

Codes are packed as faiss packs them (PQEncoderGeneric): the M codes of nbits each form one
little-endian bit stream, code 0 in the lowest bits of byte 0; ceil(M * nbits / 8) bytes per
vector. nbits = 8 is one byte per code, nbits = 4 two codes per byte (low nibble first).

The torch path (`engine="torch"`, or any `device` other than "cpu") imports torch only when
called, so torch stays an optional dependency of GPU machines. On CUDA, host rows are staged
through two pinned buffers and copied on a second stream while the previous block is encoded
(double buffering), and codes come back through two pinned buffers the same way.

Where each is used: `Codec.encode` runs the numpy reference on the CPU for PQ codecs whose
sub-vectors are not 4 or 8 wide (or narrower), where it beats faiss's `sa_encode`
(BENCHMARKS.md). On GPUs, kernels.gpu_encode's fused CUDA kernel replaces the torch path, which
is batched GEMM (`baddbmm`) + `argmin` and so writes each block's distance tensor to GPU memory;
the torch path stays as the benchmarks' naive GPU baseline.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from vecpress.kernels._faiss import faiss

#: distance bytes held at once per block (block_rows x M x 2^nbits float32): 32 MiB
DEFAULT_BLOCK_BYTES = 32 << 20


@dataclass(frozen=True)
class PQCodebook:
    """A trained product quantizer as plain arrays, plus the faiss vector transforms (OPQ, PCA,
    random rotation, MRL remap...) that the index applies before it.

    `centroids` is (M, 2^nbits, dsub) float32. `index` keeps the faiss objects that own the
    transforms alive.
    """

    centroids: np.ndarray
    nbits: int
    transforms: tuple
    index: object

    @property
    def M(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def code_size(self) -> int:
        return (self.M * self.nbits + 7) // 8

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Apply the index's pre-transforms: the vectors the PQ itself sees."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        for vt in self.transforms:
            x = vt.apply(x)
        return x


def pq_codebook(index) -> PQCodebook:
    """The product quantizer inside a trained IndexPQ / IndexPQFastScan, possibly wrapped in
    IndexPreTransform levels; ValueError for any other codec."""
    inner = faiss.downcast_index(index)
    chain = []
    while isinstance(inner, faiss.IndexPreTransform):
        chain.extend(faiss.downcast_VectorTransform(inner.chain.at(i)) for i in range(inner.chain.size()))
        inner = faiss.downcast_index(inner.index)
    if not isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        raise ValueError(f"not a product-quantizer codec: innermost index is {type(inner).__name__}")
    if not inner.is_trained:
        raise ValueError("the product quantizer is not trained")
    pq = inner.pq
    centroids = faiss.vector_to_array(pq.centroids).reshape(int(pq.M), int(pq.ksub), int(pq.dsub))
    return PQCodebook(centroids=np.ascontiguousarray(centroids, np.float32), nbits=int(pq.nbits),
                      transforms=tuple(chain), index=index)


def default_block_rows(M: int, nbits: int, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so that one block's distances (rows x M x 2^nbits float32) fit `block_bytes`."""
    per_row = M * (1 << nbits) * 4
    return max(64, min(1 << 16, block_bytes // per_row))


def _check(x, centroids: np.ndarray, nbits: int) -> tuple[int, int, int]:
    if centroids.ndim != 3:
        raise ValueError(f"centroids must be (M, 2^nbits, dsub), got shape {centroids.shape}")
    M, ksub, dsub = centroids.shape
    if ksub != 1 << nbits:
        raise ValueError(f"centroids have {ksub} per sub-quantizer, nbits={nbits} needs {1 << nbits}")
    if not 1 <= nbits <= 16:
        raise ValueError(f"nbits must be 1..16, got {nbits}")
    if len(x.shape) != 2 or x.shape[1] != M * dsub:
        raise ValueError(f"vectors must be (n, {M * dsub}) for M={M} x dsub={dsub}, got {tuple(x.shape)}")
    return M, ksub, dsub


def pack_bits(xp, bits, nbits_per_row: int):
    """(n, d) 0/1 uint8 -> (n, ceil(d / 8)) uint8, bit j of byte i = element 8 i + j (faiss's
    bit-stream order, numpy's bitorder="little"). `xp` is numpy or cupy."""
    n = bits.shape[0]
    nbytes = (nbits_per_row + 7) // 8
    pad = nbytes * 8 - nbits_per_row
    if pad:
        bits = xp.concatenate([bits, xp.zeros((n, pad), xp.uint8)], axis=1)
    weights = (1 << xp.arange(8, dtype=xp.uint32)).astype(xp.uint8)
    return (bits.reshape(n, nbytes, 8) * weights).sum(axis=2, dtype=xp.uint32).astype(xp.uint8)


def pack_codes(assign, nbits: int, xp=np):
    """(n, M) integer centroid ids -> (n, ceil(M * nbits / 8)) uint8 in faiss's PQ layout, with
    array module `xp` (numpy, or cupy for codes still on the GPU)."""
    n, M = assign.shape
    if nbits == 8:
        return assign.astype(xp.uint8, copy=False)
    if nbits == 4 and M % 2 == 0:
        a = assign.astype(xp.uint8)
        return (a[:, 0::2] | (a[:, 1::2] << 4)).astype(xp.uint8)
    bits = ((assign.astype(xp.uint32)[:, :, None] >> xp.arange(nbits, dtype=xp.uint32)) & 1).astype(xp.uint8)
    return pack_bits(xp, bits.reshape(n, M * nbits), M * nbits)


def encode_pq(x, centroids: np.ndarray, nbits: int, *, device: str = "cpu", engine: str | None = None,
              block_rows: int | None = None) -> np.ndarray:
    """PQ codes of (already pre-transformed) vectors: (n, M * dsub) -> (n, code_size) uint8.

    `device="cpu"` with `engine=None` or "numpy" runs the numpy reference; `engine="torch"` runs
    the torch kernel on `device` ("cpu", "cuda", "cuda:1"...). `x` may be a numpy array or, for
    the torch engine, a torch tensor (a pinned CPU tensor is copied to the GPU without staging;
    a CUDA tensor is encoded in place). `block_rows` (default: 32 MiB of distances) bounds memory.
    """
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    engine = engine or ("numpy" if device == "cpu" else "torch")
    if engine == "numpy":
        if device != "cpu":
            raise ValueError(f"the numpy engine runs on the CPU only, not on {device!r}")
        return _encode_numpy(np.ascontiguousarray(x, dtype=np.float32), centroids, nbits, block_rows)
    if engine != "torch":
        raise ValueError(f"unknown engine {engine!r}: 'numpy' or 'torch'")
    return _encode_torch(x, centroids, nbits, device=device, block_rows=block_rows)


# ---- numpy reference --------------------------------------------------------------------------

def _encode_numpy(x: np.ndarray, centroids: np.ndarray, nbits: int, block_rows: int | None) -> np.ndarray:
    M, ksub, dsub = _check(x, centroids, nbits)
    n = x.shape[0]
    # per sub-quantizer one GEMM of the block against its codebook: the block's distances for
    # one m at a time, so block_rows x 2^nbits floats are live (x M is the bound we promise)
    rows = block_rows or default_block_rows(1, nbits, block_bytes=4 << 20)
    ct2 = np.ascontiguousarray(centroids.transpose(0, 2, 1)) * np.float32(-2)  # (M, dsub, ksub), exact
    cnorm = (centroids ** 2).sum(axis=2, dtype=np.float32)  # (M, ksub)
    assign = np.empty((n, M), np.int32 if nbits > 8 else np.uint8)
    dist = np.empty((min(rows, max(n, 1)), ksub), np.float32)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        xb = np.ascontiguousarray(x[lo:hi].reshape(hi - lo, M, dsub).transpose(1, 0, 2))  # (M, b, dsub)
        d = dist[: hi - lo]
        for m in range(M):
            np.matmul(xb[m], ct2[m], out=d)
            d += cnorm[m]
            assign[lo:hi, m] = d.argmin(axis=1)
    return pack_codes(assign, nbits)


# ---- torch (CPU or CUDA) ----------------------------------------------------------------------

def optional_module(name: str, hint: str):
    """An optional dependency, imported on first use, or ImportError saying `hint`."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(hint) from exc


def _torch():
    return optional_module("torch", "the torch PQ encoder needs PyTorch: install it on GPU machines "
                                    "(it is not a vecpress dependency)")


def _tables(torch, centroids: np.ndarray, dev):
    c = torch.from_numpy(centroids).to(dev)
    ct = c.transpose(1, 2).contiguous()  # (M, dsub, ksub)
    cnorm = (c * c).sum(dim=2).unsqueeze(1)  # (M, 1, ksub)
    return ct, cnorm


def _pack_torch(torch, assign, nbits: int):
    """(b, M) int64 centroid ids on any device -> (b, code_size) uint8 in faiss's layout."""
    b, M = assign.shape
    if nbits == 8:
        return assign.to(torch.uint8)
    if nbits == 4 and M % 2 == 0:
        a = assign.to(torch.uint8)
        return a[:, 0::2] | (a[:, 1::2] << 4)
    shifts = torch.arange(nbits, device=assign.device)
    bits = ((assign.unsqueeze(2) >> shifts) & 1).reshape(b, M * nbits)
    nbytes = (M * nbits + 7) // 8
    pad = nbytes * 8 - M * nbits
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    weights = (1 << torch.arange(8, device=assign.device))
    return (bits.reshape(b, nbytes, 8) * weights).sum(dim=2).to(torch.uint8)


def encode_block_torch(xb, ct, cnorm, nbits: int):
    """Codes of one block already on the device: (b, M * dsub) float32 -> (b, code_size) uint8.

    One batched GEMM over the M sub-quantizers (||c||^2 - 2 x.c via baddbmm), arg-min over the
    2^nbits centroids, packing on the device. Exposed for benchmarks with data already there.
    """
    torch = _torch()
    M, dsub, _ = ct.shape
    xs = xb.reshape(xb.shape[0], M, dsub).transpose(0, 1)  # (M, b, dsub)
    dist = torch.baddbmm(cnorm, xs, ct, beta=1.0, alpha=-2.0)  # (M, b, ksub)
    assign = dist.argmin(dim=2).transpose(0, 1)  # (b, M)
    return _pack_torch(torch, assign, nbits)


def device_tables(centroids: np.ndarray, device: str):
    """(centroids^T, ||centroids||^2) on `device`, as encode_block_torch wants them."""
    torch = _torch()
    return _tables(torch, np.ascontiguousarray(centroids, np.float32), torch.device(device))


def _encode_torch(x, centroids: np.ndarray, nbits: int, *, device: str, block_rows: int | None) -> np.ndarray:
    torch = _torch()
    M, ksub, dsub = _check(x, centroids, nbits)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # "cuda" is the current device
    rows = block_rows or default_block_rows(M, nbits)
    ct, cnorm = _tables(torch, centroids, dev)
    code_size = (M * nbits + 7) // 8
    if isinstance(x, torch.Tensor) and x.device.type != "cpu":
        if x.device != dev:
            raise ValueError(f"vectors are on {x.device}, encoder asked for {dev}")
        parts = [encode_block_torch(x[lo:lo + rows].float(), ct, cnorm, nbits) for lo in range(0, x.shape[0], rows)]
        out = torch.cat(parts) if parts else torch.zeros((0, code_size), dtype=torch.uint8, device=dev)
        return out.cpu().numpy()
    if dev.type == "cuda":
        return _encode_cuda_pipelined(torch, x, ct, cnorm, nbits, dev, rows, code_size)
    xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = np.empty((xt.shape[0], code_size), np.uint8)
    with torch.inference_mode():
        for lo in range(0, xt.shape[0], rows):
            hi = min(xt.shape[0], lo + rows)
            out[lo:hi] = encode_block_torch(xt[lo:hi], ct, cnorm, nbits).numpy()
    return out


def _encode_cuda_pipelined(torch, x, ct, cnorm, nbits: int, dev, rows: int, code_size: int) -> np.ndarray:
    """Host rows -> GPU codes -> host, with transfers overlapped with compute.

    Two slots, each a pinned input buffer, a device input buffer and a pinned output buffer.
    Block i uses slot i % 2: while the GPU encodes block i on the compute stream, the host
    fills the other slot's pinned buffer with block i + 1 and the copy stream moves it to the
    device. Events order the reuse of every buffer, so nothing is overwritten while in use.
    A pinned CPU tensor `x` is copied from directly (no host staging copy).
    """
    n, d = x.shape
    out = np.empty((n, code_size), np.uint8)
    if n == 0:
        return out
    direct = isinstance(x, torch.Tensor) and x.is_pinned()
    if isinstance(x, torch.Tensor) and not direct:
        x = x.numpy()
    if not direct:
        x = np.ascontiguousarray(x, dtype=np.float32)
    rows = min(rows, n)
    copy_stream = torch.cuda.Stream(device=dev)
    compute_stream = torch.cuda.Stream(device=dev)
    host_in = [None if direct else torch.empty((rows, d), dtype=torch.float32, pin_memory=True) for _ in range(2)]
    dev_in = [torch.empty((rows, d), dtype=torch.float32, device=dev) for _ in range(2)]
    host_out = [torch.empty((rows, code_size), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    copied = [torch.cuda.Event() for _ in range(2)]  # H2D of the slot done: host_in reusable, dev_in filled
    consumed = [torch.cuda.Event() for _ in range(2)]  # encode of the slot done: dev_in reusable
    returned = [torch.cuda.Event() for _ in range(2)]  # D2H of the slot's codes done
    in_use = [False, False]
    waiting: list = [None, None]  # (lo, hi) whose codes sit in host_out[slot]

    def drain(slot):
        if waiting[slot] is not None:
            lo, hi = waiting[slot]
            returned[slot].synchronize()
            out[lo:hi] = host_out[slot][: hi - lo].numpy()
            waiting[slot] = None

    with torch.inference_mode():
        for i, lo in enumerate(range(0, n, rows)):
            hi = min(n, lo + rows)
            b = hi - lo
            s = i % 2
            drain(s)  # host_out[s] about to be overwritten
            if in_use[s]:
                copied[s].synchronize()  # the previous H2D from host_in[s] has finished
            if direct:
                src = x[lo:hi]
            else:
                src = host_in[s][:b]
                np.copyto(src.numpy(), x[lo:hi])  # pageable -> pinned, on the host, overlapping the GPU
            with torch.cuda.stream(copy_stream):
                copy_stream.wait_event(consumed[s])  # the previous encode of dev_in[s] has read it
                dev_in[s][:b].copy_(src, non_blocking=True)
                copied[s].record(copy_stream)
            with torch.cuda.stream(compute_stream):
                compute_stream.wait_event(copied[s])
                codes = encode_block_torch(dev_in[s][:b], ct, cnorm, nbits)
                consumed[s].record(compute_stream)
                host_out[s][:b].copy_(codes, non_blocking=True)
                returned[s].record(compute_stream)
            in_use[s] = True
            waiting[s] = (lo, hi)
        drain(0)
        drain(1)
        torch.cuda.synchronize(dev)
    return out

"""A naive torch PQ encoder, the GPU baseline of benchmarks/gpu_encode.py: a batched GEMM
(`baddbmm`) + `argmin` per block, which writes each block's distance tensor to GPU memory
(kernels.gpu_encode's fused kernel does not). Codes in faiss's layout. Needs PyTorch, which is
not a vecpress dependency."""

from __future__ import annotations

import numpy as np

from vecpress.kernels.pq_encode import optional_module


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

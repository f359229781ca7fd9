"""The CuPy backend's custom CUDA kernels, each paired with an array-generic fallback.

Every public function here takes the array module ``xp`` first. With CuPy it launches a
``cupy.RawKernel`` (CUDA C below, compiled by NVRTC once per kernel and dtype, cached); with any
other module (NumPy in the tests) it runs the fallback, which computes the same thing with plain
array operations in the same order of arithmetic and is the kernel's executable definition. The
GPU tests compare each kernel with its fallback on the device; without a GPU, the tests compile
the same CUDA C as host C++ and run it (``kernel_source`` and ``KERNELS`` exist for that).

Kernels (one thread per item, grid-stride loops, no shared memory and no atomics: every output
element is written by exactly one thread, so results are deterministic):

* squash_forward / squash_backward: one thread per capsule; norm, scale and the VJP fused.
* routing_softmax: one thread per (example, child); the softmax over the parents (and, with
  none_of_the_above, one more logit fixed at 0 that no parent stands for).
* routing_agreement: one thread per (example, parent, child); b += <u_hat, v>.
* routing_softmax_backward: one thread per (example, child); <u_hat, g_s>, the softmax VJP and
  the accumulation into the logits' gradient, fused.
* routing_grad_ut: one thread per element of u_hat; both of an iteration's contributions to
  u_hat's gradient in one pass.
* col2im: one thread per input pixel; the convolution's input gradient gathered (no atomics).
* adam_step: one thread per parameter element; the spec's TF-form Adam step.

What this module must never do: import cupy at module level (the fallbacks run without it), or
change its inputs except where a function says it updates an argument in place.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "KERNELS", "KernelDef", "kernel_source", "uses_kernels",
    "squash_forward", "squash_backward", "routing_softmax", "routing_agreement",
    "routing_softmax_backward", "routing_grad_ut", "col2im", "adam_step",
]

_CTYPES = {"float32": "float", "float64": "double"}
_BLOCK = 256
_MAX_GRID = 1 << 20  # grid-stride loops cover any count; more blocks than this buys nothing

# Shared by every kernel. FOR_EACH_ITEM is a grid-stride loop, so that any launch covers every
# item, and a launch of one thread (the host emulation in the tests) runs them all in order.
_PRELUDE = r"""
#define FOR_EACH_ITEM(i, count) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (count); \
         i += (long long)blockDim.x * gridDim.x)
"""


@dataclass(frozen=True)
class KernelDef:
    """One kernel: its C parameter list (T is the float type) and its body."""

    name: str
    params: tuple[str, ...]
    body: str


KERNELS: dict[str, KernelDef] = {k.name: k for k in (
    KernelDef(
        "squash_forward",
        ("const T* __restrict__ s", "T* __restrict__ out", "long long rows", "long long dim"),
        r"""
    FOR_EACH_ITEM(r, rows) {
        const T* x = s + r * dim;
        T* y = out + r * dim;
        T n2 = T(0);
        for (long long d = 0; d < dim; ++d) n2 += x[d] * x[d];
        const T n = sqrt(n2);
        // f(n) = n / (1 + n^2) written as 1 / (n + 1/n): a huge n gives ~1/n, not inf/inf.
        // f = 0 at n = 0 exactly, with no epsilon.
        const T f = n > T(0) ? T(1) / (n + T(1) / n) : T(0);
        for (long long d = 0; d < dim; ++d) y[d] = f * x[d];
    }
""",
    ),
    KernelDef(
        "squash_backward",
        ("const T* __restrict__ s", "const T* __restrict__ g", "T* __restrict__ out", "long long rows",
         "long long dim"),
        r"""
    FOR_EACH_ITEM(r, rows) {
        const T* x = s + r * dim;
        const T* gr = g + r * dim;
        T* y = out + r * dim;
        T n2 = T(0);
        for (long long d = 0; d < dim; ++d) n2 += x[d] * x[d];
        const T n = sqrt(n2);
        if (!(n > T(0))) {
            // The gradient of squash at s = 0 is 0.
            for (long long d = 0; d < dim; ++d) y[d] = T(0);
            continue;
        }
        const T f = T(1) / (n + T(1) / n);
        // n f'(n) = f q with q = 2 / (1 + n^2) - 1, finite even when n^2 overflows.
        const T q = T(2) / (T(1) + n * n) - T(1);
        T dot = T(0);
        for (long long d = 0; d < dim; ++d) dot += (x[d] / n) * gr[d];
        for (long long d = 0; d < dim; ++d) y[d] = f * (gr[d] + q * (x[d] / n) * dot);
    }
""",
    ),
    KernelDef(
        "routing_softmax",
        ("const T* __restrict__ logits", "T* __restrict__ c", "long long batch", "long long parents",
         "long long children", "int none_of_the_above"),
        r"""
    // logits and c are (batch, parents, children); the softmax runs over the parents, and with
    // none_of_the_above over one more logit fixed at 0 (counted in the max too, so exp never overflows).
    FOR_EACH_ITEM(k, batch * children) {
        const long long b = k / children;
        const long long i = k - b * children;
        const long long base = b * parents * children + i;  // (b, 0, i); parent j is + j * children
        T m = logits[base];
        for (long long j = 1; j < parents; ++j) {
            const T l = logits[base + j * children];
            m = l > m ? l : m;
        }
        if (none_of_the_above && m < T(0)) m = T(0);
        T z = none_of_the_above ? exp(-m) : T(0);
        for (long long j = 0; j < parents; ++j) {
            const T e = exp(logits[base + j * children] - m);
            c[base + j * children] = e;
            z += e;
        }
        for (long long j = 0; j < parents; ++j) c[base + j * children] = c[base + j * children] / z;
    }
""",
    ),
    KernelDef(
        "routing_agreement",
        ("const T* __restrict__ logits", "const T* __restrict__ ut", "const T* __restrict__ v",
         "T* __restrict__ out", "long long batch", "long long parents", "long long children", "long long dim"),
        r"""
    // out[b, j, i] = logits[b, j, i] + <ut[b, j, i, :], v[b, j, :]>
    FOR_EACH_ITEM(k, batch * parents * children) {
        const long long bj = k / children;
        const T* u = ut + k * dim;
        const T* vj = v + bj * dim;
        T a = T(0);
        for (long long e = 0; e < dim; ++e) a += u[e] * vj[e];
        out[k] = logits[k] + a;
    }
""",
    ),
    KernelDef(
        "routing_softmax_backward",
        ("const T* __restrict__ ut", "const T* __restrict__ gs", "const T* __restrict__ c",
         "const T* __restrict__ g_c", "T* __restrict__ gc", "T* __restrict__ g_logits", "long long batch",
         "long long parents", "long long children", "long long dim", "int has_g_c", "int accumulate"),
        r"""
    // Per (b, i): gc[b, j, i] = <ut[b, j, i, :], gs[b, j, :]> (+ g_c[b, j, i]), the gradient of the
    // coupling coefficients; then the softmax's VJP c (gc - sum_j c gc), added to g_logits
    // (or stored, when accumulate is 0). gc is scratch of shape (batch, parents, children).
    FOR_EACH_ITEM(k, batch * children) {
        const long long b = k / children;
        const long long i = k - b * children;
        const long long base = b * parents * children + i;
        T total = T(0);
        for (long long j = 0; j < parents; ++j) {
            const long long bji = base + j * children;
            const T* u = ut + bji * dim;
            const T* g = gs + (b * parents + j) * dim;
            T a = T(0);
            for (long long e = 0; e < dim; ++e) a += u[e] * g[e];
            if (has_g_c) a += g_c[bji];
            gc[bji] = a;
            total += c[bji] * a;
        }
        for (long long j = 0; j < parents; ++j) {
            const long long bji = base + j * children;
            const T d = c[bji] * (gc[bji] - total);
            g_logits[bji] = accumulate ? g_logits[bji] + d : d;
        }
    }
""",
    ),
    KernelDef(
        "routing_grad_ut",
        ("T* __restrict__ g_ut", "const T* __restrict__ g_logits", "const T* __restrict__ v",
         "const T* __restrict__ c", "const T* __restrict__ gs", "long long batch", "long long parents",
         "long long children", "long long dim", "int has_g_logits"),
        r"""
    // g_ut[b, j, i, e] += g_logits[b, j, i] v[b, j, e] (the agreement) + c[b, j, i] gs[b, j, e] (s = c u_hat)
    FOR_EACH_ITEM(k, batch * parents * children * dim) {
        const long long bji = k / dim;
        const long long e = k - bji * dim;
        const long long bj = bji / children;
        T a = g_ut[k];
        if (has_g_logits) a += g_logits[bji] * v[bj * dim + e];
        a += c[bji] * gs[bj * dim + e];
        g_ut[k] = a;
    }
""",
    ),
    KernelDef(
        "col2im",
        ("const T* __restrict__ cols", "T* __restrict__ gx", "long long batch", "long long channels",
         "long long height", "long long width", "long long kh", "long long kw", "long long stride",
         "long long out_h", "long long out_w"),
        r"""
    // cols is (batch, out_h, out_w, channels, kh, kw); gx is (batch, channels, height, width).
    // Input pixel (h, w) meets kernel offset (i, j) at output ((h - i) / stride, (w - j) / stride)
    // when both divide exactly and land inside the output. Gathering (one writer per pixel)
    // needs no atomics; offsets are visited in the reference's order, so the sum is its sum.
    FOR_EACH_ITEM(k, batch * channels * height * width) {
        const long long w = k % width;
        long long t = k / width;
        const long long h = t % height;
        t /= height;
        const long long ch = t % channels;
        const long long b = t / channels;
        T a = T(0);
        for (long long i = 0; i < kh && i <= h; ++i) {
            const long long hy = h - i;
            if (hy % stride != 0) continue;
            const long long y = hy / stride;
            if (y >= out_h) continue;
            for (long long j = 0; j < kw && j <= w; ++j) {
                const long long wx = w - j;
                if (wx % stride != 0) continue;
                const long long x = wx / stride;
                if (x >= out_w) continue;
                a += cols[((((b * out_h + y) * out_w + x) * channels + ch) * kh + i) * kw + j];
            }
        }
        gx[k] = a;
    }
""",
    ),
    KernelDef(
        "adam_step",
        ("const T* __restrict__ p", "const T* __restrict__ g", "const T* __restrict__ m",
         "const T* __restrict__ v", "T* __restrict__ p_out", "T* __restrict__ m_out", "T* __restrict__ v_out",
         "long long size", "double alpha", "T beta1", "T one_minus_beta1", "T beta2", "T one_minus_beta2",
         "T epsilon"),
        r"""
    FOR_EACH_ITEM(k, size) {
        const T gk = g[k];
        const T mk = beta1 * m[k] + one_minus_beta1 * gk;
        const T vk = beta2 * v[k] + one_minus_beta2 * (gk * gk);
        // The reference's step size alpha is a float64 scalar, so its step is formed in double
        // for float32 parameters too and rounded once when stored.
        const double step = alpha * (double)mk / (double)(sqrt(vk) + epsilon);
        p_out[k] = (T)((double)p[k] - step);
        m_out[k] = mk;
        v_out[k] = vk;
    }
""",
    ),
)}


def kernel_source(name: str, dtype: str) -> str:
    """The complete CUDA C source of kernel `name` for float dtype `dtype` ("float32"/"float64")."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; kernels are {sorted(KERNELS)}")
    if dtype not in _CTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    k = KERNELS[name]
    params = ",\n    ".join(k.params)
    return (f"typedef {_CTYPES[dtype]} T;\n{_PRELUDE}\n"
            f'extern "C" __global__ void {k.name}(\n    {params})\n{{{k.body}}}\n')


def uses_kernels(xp: Any) -> bool:
    """True when `xp` is CuPy, so the compiled kernels run; False runs the fallbacks."""
    return getattr(xp, "__name__", "") == "cupy"


@functools.lru_cache(maxsize=None)
def _compiled(name: str, dtype: str) -> Any:
    import cupy

    # No fast-math: the kernels must round like the reference's arithmetic.
    return cupy.RawKernel(kernel_source(name, dtype), name)


def _launch(name: str, dtype: Any, count: int, args: tuple) -> None:
    if count == 0:
        return
    grid = min((count + _BLOCK - 1) // _BLOCK, _MAX_GRID)
    _compiled(name, np.dtype(dtype).name)((grid,), (_BLOCK,), args)


def _ll(n: int) -> np.int64:
    return np.int64(n)


def _flag(b: bool) -> np.int32:
    return np.int32(1 if b else 0)


def _errstate(xp: Any):
    errstate = getattr(xp, "errstate", None)
    return errstate(over="ignore") if errstate is not None else contextlib.nullcontext()


# ============================================================================== squash
def extreme_norms(xp: Any, s: Any) -> tuple[Any, Any, Any, Any, Any]:
    """For rows (last axis) whose |s|^2 over- or underflows, what the plain formulas get wrong, computed on
    s / max|s_i|: (the mask of those rows, |s|, s != 0, the unit vector, f = |s| / (1 + |s|^2)). Plain
    array code (no data-dependent branch, so no device sync); the kernels' results stand elsewhere."""
    with _errstate(xp):
        sq = xp.sum(s * s, axis=-1, keepdims=True)
        info = np.finfo(s.dtype)
        risky = ~((sq >= info.tiny) & (sq <= info.max))
        m = xp.max(xp.abs(s), axis=-1, keepdims=True)
        m = xp.where(m > 0, m, 1).astype(s.dtype, copy=False)
        r = s / m
        rsq = xp.sum(r * r, axis=-1, keepdims=True)  # in [1, dim] unless s = 0
        nz = rsq != 0  # NaN counts as non-zero: NaN in, NaN out
        rn = xp.sqrt(xp.where(nz, rsq, 1))
        n = m * rn
        # f = 1 / (n + 1/n); where n itself overflows, 1/|s| = (1/m) / rn.
        f = xp.where(nz, xp.where(xp.isinf(n), (1 / m) / rn, 1 / (n + 1 / n)), 0).astype(s.dtype, copy=False)
    return risky, n, nz, (r / rn).astype(s.dtype, copy=False), f


def squash_forward(xp: Any, s: Any) -> Any:
    """squash along the last axis: s |s| / (1 + |s|^2), 0 at s = 0, over the whole finite range (rows whose
    |s|^2 over- or underflows are recomputed scaled; beyond sqrt(max) v is the unit vector). A new array."""
    if not uses_kernels(xp):
        with _errstate(xp):  # an extreme row's plain result is replaced below
            n = xp.sqrt(xp.sum(s * s, axis=-1, keepdims=True))
        nz = n > 0
        safe_n = xp.where(nz, n, 1)
        f = xp.where(nz, 1 / (safe_n + 1 / safe_n), 0).astype(s.dtype, copy=False)
        out = f * s
    else:
        s = xp.ascontiguousarray(s)
        out = xp.empty_like(s)
        dim = s.shape[-1]
        rows = s.size // dim if dim else 0
        _launch("squash_forward", s.dtype, rows, (s, out, _ll(rows), _ll(dim)))
    risky, n, nz, unit, f = extreme_norms(xp, s)
    with _errstate(xp):
        safe = xp.where(n > np.sqrt(np.finfo(s.dtype).max), unit, f * s)
    return xp.where(risky, safe, out).astype(s.dtype, copy=False)


def squash_backward(xp: Any, s: Any, g: Any) -> Any:
    """VJP of squash along the last axis: f g + f q unit (unit . g); 0 at s = 0 (extreme rows as in
    squash_forward)."""
    if not uses_kernels(xp):
        with _errstate(xp):  # an extreme row's plain result is replaced below
            n = xp.sqrt(xp.sum(s * s, axis=-1, keepdims=True))
        nz = n > 0
        safe_n = xp.where(nz, n, 1)
        unit = xp.where(nz, s / safe_n, 0)
        f = xp.where(nz, 1 / (safe_n + 1 / safe_n), 0).astype(s.dtype, copy=False)
        with _errstate(xp):
            q = 2 / (1 + n * n) - 1
        out = f * (g + q * unit * xp.sum(unit * g, axis=-1, keepdims=True))
    else:
        s = xp.ascontiguousarray(s)
        g = xp.ascontiguousarray(g)
        out = xp.empty_like(s)
        dim = s.shape[-1]
        rows = s.size // dim if dim else 0
        _launch("squash_backward", s.dtype, rows, (s, g, out, _ll(rows), _ll(dim)))
    risky, n, nz, unit, f = extreme_norms(xp, s)
    with _errstate(xp):
        q = 2 / (1 + n * n) - 1
        safe = f * (g + q * unit * xp.sum(unit * g, axis=-1, keepdims=True))
    return xp.where(risky, safe, out).astype(s.dtype, copy=False)


# ============================================================================== routing
# Routing works in the layout (B, J, N, E) for u_hat ("ut") and (B, J, N) for logits and
# coupling coefficients, so that the softmax over parents j reads a stride-N column and every
# other access is contiguous in the child index.
def routing_softmax(xp: Any, logits: Any, none_of_the_above: bool = False) -> Any:
    """Coupling coefficients c = softmax over the parents (axis 1) of logits (B, J, N); with
    none_of_the_above over one more logit, fixed at 0, that no parent stands for."""
    if not uses_kernels(xp):
        top = logits.max(axis=1, keepdims=True)
        if none_of_the_above:
            top = xp.maximum(top, 0)
        z = xp.exp(logits - top)
        total = z.sum(axis=1, keepdims=True)
        return z / (total + xp.exp(-top) if none_of_the_above else total)
    logits = xp.ascontiguousarray(logits)
    bsz, j, n = logits.shape
    c = xp.empty_like(logits)
    _launch("routing_softmax", logits.dtype, bsz * n,
            (logits, c, _ll(bsz), _ll(j), _ll(n), _flag(none_of_the_above)))
    return c


def routing_agreement(xp: Any, logits: Any, ut: Any, v: Any) -> Any:
    """The logits after one update: logits + <u_hat, v>, i.e. (B, J, N) + ut (B, J, N, E) . v (B, J, E)."""
    if not uses_kernels(xp):
        return logits + xp.matmul(ut, v[:, :, :, None])[..., 0]
    logits, ut, v = (xp.ascontiguousarray(a) for a in (logits, ut, v))
    bsz, j, n, e = ut.shape
    out = xp.empty_like(logits)
    _launch("routing_agreement", ut.dtype, bsz * j * n, (logits, ut, v, out, _ll(bsz), _ll(j), _ll(n), _ll(e)))
    return out


def routing_softmax_backward(xp: Any, ut: Any, gs: Any, c: Any, g_c: Any | None, g_logits: Any | None) -> Any:
    """The logits' gradient after one iteration's softmax: g_logits + c (gc - sum_j c gc).

    gc = <u_hat, gs> (+ g_c, a cotangent of c given in the (B, J, N) layout) is the gradient of
    the coupling coefficients. g_logits None means zero. On the GPU g_logits is updated in
    place; either way the result is returned.
    """
    if not uses_kernels(xp):
        gc = xp.matmul(ut, gs[:, :, :, None])[..., 0]
        if g_c is not None:
            gc = gc + g_c
        g_prev = c * (gc - xp.sum(c * gc, axis=1, keepdims=True))
        return g_prev if g_logits is None else g_logits + g_prev
    ut, gs, c = (xp.ascontiguousarray(a) for a in (ut, gs, c))
    bsz, j, n, e = ut.shape
    scratch = xp.empty_like(c)
    # Unused pointer arguments get an array that the kernel never reads (flags say so).
    g_c_arg = c if g_c is None else xp.ascontiguousarray(g_c)
    if g_logits is None:
        g_logits = xp.empty_like(c)
        accumulate = False
    else:
        accumulate = True
        if not g_logits.flags.c_contiguous:
            g_logits = xp.ascontiguousarray(g_logits)
    _launch("routing_softmax_backward", ut.dtype, bsz * n,
            (ut, gs, c, g_c_arg, scratch, g_logits, _ll(bsz), _ll(j), _ll(n), _ll(e),
             _flag(g_c is not None), _flag(accumulate)))
    return g_logits


def routing_grad_ut(xp: Any, g_ut: Any, g_logits: Any | None, v: Any, c: Any, gs: Any) -> Any:
    """Adds one iteration's gradient to g_ut (B, J, N, E) in place and returns it:
    g_logits v (from b += <u_hat, v>; skipped when g_logits is None) + c gs (from s = sum c u_hat)."""
    if not uses_kernels(xp):
        if g_logits is not None:
            g_ut += g_logits[..., None] * v[:, :, None, :]
        g_ut += c[..., None] * gs[:, :, None, :]
        return g_ut
    if not g_ut.flags.c_contiguous:
        raise ValueError("g_ut must be C-contiguous: it is updated in place")
    v, c, gs = (xp.ascontiguousarray(a) for a in (v, c, gs))
    g_logits_arg = c if g_logits is None else xp.ascontiguousarray(g_logits)
    bsz, j, n, e = g_ut.shape
    _launch("routing_grad_ut", g_ut.dtype, g_ut.size,
            (g_ut, g_logits_arg, v, c, gs, _ll(bsz), _ll(j), _ll(n), _ll(e), _flag(g_logits is not None)))
    return g_ut


# ============================================================================== convolution
def col2im(xp: Any, cols: Any, x_shape: tuple[int, int, int, int], stride: int) -> Any:
    """The convolution's input gradient from the column gradient cols (B, Ho, Wo, C, kh, kw)."""
    b, c, h, w = x_shape
    _, ho, wo, _, kh, kw = cols.shape
    if not uses_kernels(xp):
        gx = xp.zeros(x_shape, dtype=cols.dtype)
        # One strided slice per kernel offset: the loop is over the kernel, never over examples.
        for i in range(kh):
            for j in range(kw):
                gx[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] += (
                    cols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
                )
        return gx
    cols = xp.ascontiguousarray(cols)
    gx = xp.empty(x_shape, dtype=cols.dtype)
    _launch("col2im", cols.dtype, gx.size,
            (cols, gx, _ll(b), _ll(c), _ll(h), _ll(w), _ll(kh), _ll(kw), _ll(stride), _ll(ho), _ll(wo)))
    return gx


# ============================================================================== Adam
def adam_step(xp: Any, p: Any, g: Any, m: Any, v: Any, alpha: float, beta1: float, beta2: float,
              epsilon: float) -> tuple[Any, Any, Any]:
    """One TF-form Adam step for one parameter: (new p, new m, new v); alpha is the step size
    lr * sqrt(1 - beta2^t) / (1 - beta1^t)."""
    alpha = np.float64(alpha)
    if not uses_kernels(xp):
        m_new = beta1 * m + (1 - beta1) * g
        v_new = beta2 * v + (1 - beta2) * (g * g)
        p_new = (p - (alpha * m_new / (xp.sqrt(v_new) + epsilon))).astype(p.dtype, copy=False)
        return p_new, m_new.astype(p.dtype, copy=False), v_new.astype(p.dtype, copy=False)
    p, g, m, v = (xp.ascontiguousarray(a) for a in (p, g, m, v))
    p_out, m_out, v_out = xp.empty_like(p), xp.empty_like(p), xp.empty_like(p)
    t = p.dtype.type
    _launch("adam_step", p.dtype, p.size,
            (p, g, m, v, p_out, m_out, v_out, _ll(p.size), alpha, t(beta1), t(1 - beta1), t(beta2),
             t(1 - beta2), t(epsilon)))
    return p_out, m_out, v_out

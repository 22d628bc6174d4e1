"""The fused LoRA linear op: one autograd node for base product, LoRA branch and bias.

    y = x W^T + b + s * dropout(x) A^T B^T          (s = alpha / rank, or alpha / sqrt(rank))

Forward keeps u = s * dropout(x) A^T (N, R), the only intermediate backward needs besides
x itself; dropout's mask is not kept but recomputed from its seed (csrc/lora.pyx).
Backward gives dx, dA, dB (and db) in one function and never forms dW for a frozen W:

    v  = s * g B                      (N, R)   shared by dx and dA
    dx = g W + mask * (v A)           (N, I)
    dA = v^T dropout(x)               (R, I)
    dB = g^T u                        (O, R)   u from forward, not recomputed
    db = sum_n g                      (O,)

A dense layer without dropout runs as csrc/lora_linear.pyx: per row block, the base product on
BLAS and the rank-R products right after it, in one OpenMP region each way. Otherwise every
product is a BLAS GEMM through fastlora._runtime.gemm.matmul. The base weight is a Tensor (dense), or
any frozen object with `.shape == (O, I)`, `.matmul(x2) -> x2 W^T` and `.matmul_t(g2) -> g2 W`
(the QLoRA hook: a quantized weight that never materialises W in full).
Dimension letters: N rows (batch * time), I in_features, O out_features, R rank.
"""
import numpy as np

from fastlora._ext import lora_linear as _lora_linear
from fastlora._ext import lora as _lora
from fastlora._runtime import blas
from fastlora._runtime import gemm
from fastlora._runtime.threads import threads_for
from fastlora.autograd.tensor import Tensor, make_result
from fastlora.lora.kernels import check_dropout_args


def _check(x, weight, bias, lora_A, lora_B):
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a Tensor or None, got {type(bias).__name__}")
    dense = isinstance(weight, Tensor)
    if not dense and not (hasattr(weight, "matmul") and hasattr(weight, "matmul_t")):
        raise TypeError(f"weight must be a Tensor or provide matmul/matmul_t, got {type(weight).__name__}")
    dtype = weight.dtype if dense else lora_A.dtype
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the weight is {dtype}; cast one of them")
    if len(weight.shape) != 2:
        raise ValueError(f"weight must be (out_features, in_features), got shape {weight.shape}")
    O, I = weight.shape
    if x.ndim < 1 or x.shape[-1] != I:
        raise ValueError(f"x must be (..., {I}) for in_features={I}, got shape {x.shape}")
    R = lora_A.shape[0]
    if lora_A.shape != (R, I) or lora_B.shape != (O, R):
        raise ValueError(f"lora_A must be (R, {I}) and lora_B ({O}, R) with the same R, "
                         f"got {lora_A.shape} and {lora_B.shape}")
    if bias is not None and bias.shape != (O,):
        raise ValueError(f"bias must be ({O},), got {bias.shape}")


def _dropout(x2, threshold, scale, seed):
    """The dropped-out copy of the C-contiguous (N, I) array x2."""
    out = np.empty_like(x2)
    _lora.lora_dropout_forward(out.reshape(-1), x2.reshape(-1), threshold, scale, seed,
                               threads_for(x2.size))
    return out


def _fused_kernel_takes(dtype):
    """Whether csrc/lora_linear.pyx runs a dense, dropout-free product of this dtype (one for all
    operands: _check made sure): it calls NumPy's BLAS itself, in float32 or float64."""
    return gemm.fused_available() and dtype in (np.float32, np.float64)


def _fused_forward(x2, W, bias, A, B, scaling):
    """(out (N, O), u (N, R)) by the fused kernel; x2 C-contiguous."""
    N, (O, I), R = x2.shape[0], W.shape, A.shape[0]
    dtype = x2.dtype
    out = np.empty((N, O), dtype=dtype)
    u = np.empty((N, R), dtype=dtype)
    scaled_AT = np.ascontiguousarray(A.T) * dtype.type(scaling)  # (I, R): u = x (s A^T)
    threads = blas.threads_for_gemm(N, O, I)
    blas.use(1, force=True)  # the kernel's threads each call BLAS, which must not start its own
    _lora_linear.lora_linear_forward(out, u, x2, np.ascontiguousarray(W),
                                     np.empty(0, dtype) if bias is None else np.ascontiguousarray(bias),
                                     scaled_AT, np.ascontiguousarray(B.T), threads)
    return out, u


def _fused_backward(g2, x2, u, W, A, B, scaling, want_dx):
    """(dx (N, I) or None, dA (R, I), dB (O, R)) by the fused kernel; g2, x2 C-contiguous."""
    N, (O, I), R = g2.shape[0], W.shape, A.shape[0]
    dtype = g2.dtype
    threads = blas.threads_for_gemm(N, I, O)
    dx = np.empty((N, I) if want_dx else (0, I), dtype=dtype)
    dA_parts = np.empty((threads, R, I), dtype=dtype)
    dB_parts = np.empty((threads, O, R), dtype=dtype)
    scratch = np.empty((threads, _lora_linear.CHUNK_ROWS, R), dtype=dtype)
    blas.use(1, force=True)
    _lora_linear.lora_linear_backward(dx, dA_parts, dB_parts, scratch, g2, x2, u, np.ascontiguousarray(W),
                                      np.ascontiguousarray(A), B * dtype.type(scaling), threads)
    return (dx if want_dx else None), dA_parts.sum(axis=0), dB_parts.sum(axis=0)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0):
    """x (..., I) -> (..., O): x W^T + b + scaling * dropout(x) A^T B^T as one autograd op.

    weight (O, I) is the base weight: a Tensor, normally frozen (then it gets no gradient), or
    a frozen object with matmul/matmul_t (see the module docstring); bias (O,)
    or None; lora_A (R, I); lora_B (O, R); all Tensors of one dtype. dropout_p applies to
    the LoRA branch only; pass 0 outside training. seed (an int in [0, 2**32)) picks the
    dropout mask, which backward recomputes.
    """
    _check(x, weight, bias, lora_A, lora_B)
    threshold, keep_scale, seed = check_dropout_args(dropout_p, seed, x.size if dropout_p > 0 else 0)
    use_dropout = dropout_p > 0.0
    xd, A, B = x.data, lora_A.data, lora_B.data
    dense = isinstance(weight, Tensor)
    if dense:
        W = weight.data
        bias_data = None if bias is None else bias.data
        base_matmul, base_matmul_t = (lambda a: gemm.matmul(a, W, trans_b=True, bias=bias_data)), \
            (lambda a: gemm.matmul(a, W))
    else:
        base_matmul, base_matmul_t = weight.matmul, weight.matmul_t
    O, I = weight.shape
    x2 = xd.reshape(-1, I)
    if use_dropout:
        x2 = np.ascontiguousarray(x2)  # the kernel indexes elements by flat C-order position
    N = x2.shape[0]

    fused = dense and not use_dropout and _fused_kernel_takes(x2.dtype)
    if fused:  # csrc/lora_linear.pyx: base GEMM and rank-R products per row block, one pass
        x2 = np.ascontiguousarray(x2)
        out, u = _fused_forward(x2, W, bias_data, A, B, scaling)
    else:
        out = base_matmul(x2)  # (N, O): the base product, the one big GEMM (with the bias, if dense)
        if bias is not None and not dense:
            out += bias.data
        xin = _dropout(x2, threshold, keep_scale, seed) if use_dropout else x2
        u = gemm.matmul(xin, A, trans_b=True)  # (N, R)
        del xin  # backward recomputes the dropped-out input from the seed rather than holding it
        u *= scaling  # kept scaled: dB = g^T u needs no further multiply
        gemm.matmul(u, B, trans_b=True, out=out, accumulate=True)
    out = out.reshape(*xd.shape[:-1], O)

    def separate_products(g2):
        """(dx (N, I) or None, dA, dB) one BLAS product at a time: with dropout, a quantized W,
        or a frozen A or B, which the fused kernel does not take."""
        dx = dA = dB = v = None
        if x.requires_grad or lora_A.requires_grad:
            v = gemm.matmul(g2, B)  # (N, R)
            v *= scaling
        if x.requires_grad:
            dx = np.ascontiguousarray(base_matmul_t(g2))  # (N, I); the kernel below writes it flat
            if use_dropout:
                t = gemm.matmul(v, A)  # gradient at the dropout output
                _lora.lora_dropout_backward(dx.reshape(-1), t.reshape(-1), threshold, keep_scale, seed,
                                            threads_for(t.size))
            else:
                gemm.matmul(v, A, out=dx, accumulate=True)
        if lora_A.requires_grad:
            xin_again = _dropout(x2, threshold, keep_scale, seed) if use_dropout else x2
            dA = gemm.matmul(v, xin_again, trans_a=True)
        if lora_B.requires_grad:
            dB = gemm.matmul(g2, u, trans_a=True)
        return dx, dA, dB

    def backward(g):
        g2 = g.reshape(N, O)
        if fused and lora_A.requires_grad and lora_B.requires_grad:
            g2 = np.ascontiguousarray(g2)
            dx, dA, dB = _fused_backward(g2, x2, u, W, A, B, scaling, x.requires_grad)
        else:
            dx, dA, dB = separate_products(g2)
        dx = None if dx is None else dx.reshape(xd.shape)
        dW = db = None
        if dense and weight.requires_grad:  # only when a caller unfroze the base weight on purpose
            dW = gemm.matmul(g2, x2, trans_a=True)
        if bias is not None and bias.requires_grad:
            db = g2.sum(axis=0)
        grads = (dx, dA, dB) + ((dW,) if dense else ()) + ((db,) if bias is not None else ())
        return grads  # in the order of `parents` below

    parents = (x, lora_A, lora_B) + ((weight,) if dense else ()) + ((bias,) if bias is not None else ())
    return make_result(out, parents, backward)

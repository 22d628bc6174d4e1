"""How a new adapter's A (R, I) and B (O, R) start: PEFT's `init_lora_weights` options.

    True             A Kaiming-uniform, B zeros (the adapter starts as a no-op)
    False            A Kaiming-uniform, B uniform too (not a no-op: for tests)
    "gaussian"       A ~ N(0, 1/R), B zeros
    "pissa"          A, B from W's top-R singular triplets; W becomes W - s B A (PiSSA)
    "pissa_niter_K"  the same from a randomised SVD with K subspace iterations (Halko et al.)
    "olora"          A, B from W's QR: B = Q[:, :R], A = R[:R]; W becomes W - s B A (OLoRA)

`initial_weights(kind, W, rank, scaling, rng, dtype)` -> (A, B, W_res), W_res None unless the
init rewrites the base weight (then the model is unchanged: W_res + s B A == W). As in PEFT,
PiSSA and OLoRA work on W in float32 (float64 stays float64), W (O, I) as Linear stores it.
"""
import numpy as np

from fastlora.lora.config import pissa_niter


def kaiming_uniform(rng, shape, dtype):
    """PyTorch's kaiming_uniform_(a=sqrt(5)) as PEFT uses for A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(shape[1])
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def initial_weights(kind, weight, rank, scaling, rng, dtype):
    """(A, B, W_res or None) for init_lora_weights=`kind` on the base weight ndarray (O, I)."""
    O, I = weight.shape
    if kind is True or kind is False:
        A = kaiming_uniform(rng, (rank, I), dtype)
        # PEFT leaves nn.Linear(R, O)'s own init on B when init_lora_weights=False
        B = kaiming_uniform(rng, (O, rank), dtype) if kind is False else np.zeros((O, rank), dtype)
        return A, B, None
    if kind == "gaussian":
        return (rng.standard_normal((rank, I)) / rank).astype(dtype), np.zeros((O, rank), dtype), None
    work = weight.astype(np.float64 if weight.dtype == np.float64 else np.float32)
    if kind == "olora":
        Q, R_ = np.linalg.qr(work)
        B, A = Q[:, :rank], R_[:rank]
    else:
        niter = pissa_niter(kind)
        if niter is None:
            U, S, Vh = np.linalg.svd(work, full_matrices=False)
            U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
        else:
            U, S, Vh = svd_lowrank(work, rank, niter, rng)
        S = S / scaling
        A = np.sqrt(S)[:, None] * Vh  # diag(sqrt(S)) Vh
        B = U * np.sqrt(S)[None, :]   # U diag(sqrt(S))
    A, B = A.astype(work.dtype), B.astype(work.dtype)
    residual = (work - scaling * (B @ A)).astype(weight.dtype)
    return np.ascontiguousarray(A, dtype=dtype), np.ascontiguousarray(B, dtype=dtype), residual


def svd_lowrank(M, q, niter, rng):
    """Approximate top-q SVD of M (m, n) -> (U (m, q), S (q,), Vh (q, n)), as torch.svd_lowrank:
    a Gaussian sketch, `niter` power iterations re-orthonormalised by QR, then an exact SVD of
    the small projected matrix (Halko, Martinsson, Tropp 2009, Algorithm 5.1)."""
    transposed = M.shape[0] < M.shape[1]  # work on the tall side
    A = M.T if transposed else M
    Q = np.linalg.qr(A @ rng.standard_normal((A.shape[1], q)).astype(A.dtype))[0]
    for _ in range(niter):
        Q = np.linalg.qr(A.T @ Q)[0]
        Q = np.linalg.qr(A @ Q)[0]
    U, S, Vh = np.linalg.svd(Q.T @ A, full_matrices=False)
    U = Q @ U
    if transposed:
        return Vh.T, S, U.T
    return U, S, Vh

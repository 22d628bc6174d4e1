# cython: language_level=3
"""AdamW, fused: one pass over a parameter updates it and both moment buffers in place.

The arithmetic follows torch.optim.AdamW (decoupled weight decay, bias correction) step by
step, in the parameter's own precision, so float32 results stay within rounding of torch's:

    p  = p * (1 - lr * weight_decay)
    m  = lerp(m, g, 1 - beta1)                 # torch's two-branch lerp, chosen by the wrapper
    v  = v * beta2 + (1 - beta2) * g * g
    p  = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)

Scalars that depend on the step (step_size = lr / (1 - beta1**t), bc2_sqrt = sqrt(1 - beta2**t))
are computed once by the wrapper in double. Arrays are flattened by the wrapper; the kernel
never validates or allocates. Small arrays run a plain loop (num_threads == 1) because
entering an OpenMP region costs more than a small job.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, sqrtf

# With the default -fmath-errno, GCC guards every sqrt with a branch that may call libm to set
# errno, and a loop with a branch does not vectorize: the update ran ~4x slower. The moments
# are never negative, so errno is never set anyway. The pragma applies to the functions that
# follow it in the generated C file (this module only); other compilers ignore the block.
cdef extern from *:
    """
    #if defined(__GNUC__) && !defined(__clang__)
    #pragma GCC optimize ("no-math-errno")
    #endif
    """


cdef inline floating _sqrt(floating v) noexcept nogil:
    if floating is float:
        return sqrtf(v)
    else:
        return sqrt(v)


cdef inline void _update(floating* p, floating* m, floating* v, const floating g,
                         floating decay, floating w1, bint lerp_from_start, floating beta2,
                         floating one_minus_beta2, floating step_size, floating bc2_sqrt,
                         floating eps) noexcept nogil:
    cdef floating mi = m[0], vi, pi = p[0] * decay
    # torch's lerp: weight < 0.5 steps from the start, otherwise back from the end; the
    # same formula keeps float32 results within an ulp of torch's. Both are computed and one
    # is selected, so the loop has no branch and vectorizes.
    mi = (mi + w1 * (g - mi)) if lerp_from_start else (g - (g - mi) * (<floating>1.0 - w1))
    vi = v[0] * beta2 + one_minus_beta2 * g * g
    m[0] = mi
    v[0] = vi
    p[0] = pi - step_size * (mi / (_sqrt(vi) / bc2_sqrt + eps))


def adamw_step(floating[::1] param,             # (N,)  updated in place
               floating[::1] exp_avg,           # (N,)  first moment, updated in place
               floating[::1] exp_avg_sq,        # (N,)  second moment, updated in place
               const floating[::1] grad,        # (N,)
               double decay,                    # 1 - lr * weight_decay
               double one_minus_beta1,          # the lerp weight
               double beta2,
               double step_size,                # lr / (1 - beta1**step)
               double bc2_sqrt,                 # sqrt(1 - beta2**step)
               double eps,
               int num_threads=1):
    cdef Py_ssize_t N = param.shape[0], i
    cdef floating f_decay = <floating>decay, f_w1 = <floating>one_minus_beta1
    cdef floating f_beta2 = <floating>beta2, f_omb2 = <floating>(1.0 - beta2)
    cdef floating f_step = <floating>step_size, f_bc2 = <floating>bc2_sqrt, f_eps = <floating>eps
    cdef bint from_start = one_minus_beta1 < 0.5
    cdef floating* p
    cdef floating* m
    cdef floating* v
    cdef const floating* g
    if N == 0:
        return
    p, m, v, g = &param[0], &exp_avg[0], &exp_avg_sq[0], &grad[0]
    if num_threads > 1:
        for i in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            _update(p + i, m + i, v + i, g[i], f_decay, f_w1, from_start, f_beta2, f_omb2,
                    f_step, f_bc2, f_eps)
    else:
        with nogil:
            for i in range(N):
                _update(p + i, m + i, v + i, g[i], f_decay, f_w1, from_start, f_beta2, f_omb2,
                        f_step, f_bc2, f_eps)

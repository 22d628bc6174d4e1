# cython: language_level=3
"""SGD with optional momentum, dampening, Nesterov and weight decay, fused over one parameter.

The arithmetic follows torch.optim.SGD in the parameter's own precision:

    d = g + weight_decay * p
    b = d                                  on the first step with momentum (no dampening), else
    b = momentum * b + (1 - dampening) * d
    d = d + momentum * b  (Nesterov)  or  d = b
    p = p - lr * d

Without momentum the buffer is not touched (the wrapper passes an empty one). Arrays are
flattened by the wrapper; the kernel never validates or allocates. The per-element work has
no branches (the flags pick between values computed either way) so the loops vectorize.
Small arrays run a plain loop (num_threads == 1): entering an OpenMP region costs more.
"""
from cython cimport floating
from cython.parallel cimport prange


cdef inline void _plain(floating* p, const floating g, floating lr,
                        floating weight_decay) noexcept nogil:
    p[0] = p[0] - lr * (g + weight_decay * p[0])


cdef inline void _momentum(floating* p, floating* b, const floating g, floating lr,
                           floating momentum, floating keep, floating weight_decay,
                           bint first, bint nesterov) noexcept nogil:
    cdef floating d = g + weight_decay * p[0]
    cdef floating bi = d if first else momentum * b[0] + keep * d
    b[0] = bi
    p[0] = p[0] - lr * ((d + momentum * bi) if nesterov else bi)


def sgd_step(floating[::1] param,             # (N,)  updated in place
             floating[::1] momentum_buffer,   # (N,) updated in place, or (0,) without momentum
             const floating[::1] grad,        # (N,)
             double lr,
             double momentum,
             double dampening,
             double weight_decay,
             bint nesterov,
             bint first_step,                 # the buffer is uninitialised: copy d into it
             int num_threads=1):
    cdef Py_ssize_t N = param.shape[0], i
    cdef floating f_lr = <floating>lr, f_mom = <floating>momentum
    cdef floating f_keep = <floating>(1.0 - dampening), f_wd = <floating>weight_decay
    cdef floating* p
    cdef floating* b
    cdef const floating* g
    if N == 0:
        return
    p, g = &param[0], &grad[0]
    if momentum == 0.0:
        if num_threads > 1:
            for i in prange(N, nogil=True, schedule="static", num_threads=num_threads):
                _plain(p + i, g[i], f_lr, f_wd)
        else:
            with nogil:
                for i in range(N):
                    _plain(p + i, g[i], f_lr, f_wd)
        return
    b = &momentum_buffer[0]
    if num_threads > 1:
        for i in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            _momentum(p + i, b + i, g[i], f_lr, f_mom, f_keep, f_wd, first_step, nesterov)
    else:
        with nogil:
            for i in range(N):
                _momentum(p + i, b + i, g[i], f_lr, f_mom, f_keep, f_wd, first_step, nesterov)

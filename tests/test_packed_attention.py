"""Attention over packed rows: each token attends within its own record (segment starts), on the
fused kernel and NumPy's path, against the NumPy twin, record by record, and by gradcheck."""
import numpy as np
import pytest

from conftest import assert_close, numerical_grad
from fastlora import reference
from fastlora._runtime import attention as _attention
from fastlora.autograd import Tensor, ops


def _positions(rng, B, T):
    """position_ids of rows packed with records of random lengths (the last may be padding)."""
    rows = []
    for _ in range(B):
        row = []
        while len(row) < T:
            row += list(range(int(rng.integers(1, T // 2 + 2))))
        rows.append(row[:T])
    return np.array(rows)


CASES = [(2, 9, 4, None), (3, 33, 6, 2), (1, 70, 4, 1), (2, 130, 2, None)]  # B, T, H, Hkv


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B, T, H, Hkv", CASES)
def test_forward_and_backward_match_the_twin(rng, path, threads, dtype, B, T, H, Hkv):
    hd = 8
    q = rng.standard_normal((B, T, H * hd)).astype(dtype)
    k, v = (rng.standard_normal((B, T, (Hkv or H) * hd)).astype(dtype) for _ in range(2))
    starts = _attention.segment_starts(_positions(rng, B, T), (B, T))
    out, probs = _attention.forward(q, k, v, H, Hkv, starts=starts)
    ref_out, ref_probs = reference.causal_attention_forward(q, k, v, H, Hkv, segment_starts=starts)
    assert_close(probs, ref_probs, dtype)
    assert_close(out, ref_out, dtype)
    i = np.arange(T)
    before = i[None, None, :] < np.repeat(starts, H, axis=0)[:, :, None]
    assert (probs[before] == 0).all()  # nothing attends across records
    g = rng.standard_normal(q.shape).astype(dtype)
    for got, want in zip(_attention.backward(g, probs, q, k, v, H, Hkv, starts=starts),
                         reference.causal_attention_backward(g, ref_probs, q, k, v, H, Hkv)):
        assert_close(got, want, dtype, scale=4)


def test_each_record_attends_as_if_it_were_alone(rng, path):
    B, T, H, hd = 2, 40, 4, 8
    pos = _positions(rng, B, T)
    starts = _attention.segment_starts(pos, (B, T))
    q, k, v = (rng.standard_normal((B, T, H * hd)) for _ in range(3))
    out, _ = _attention.forward(q, k, v, H, starts=starts)
    for b in range(B):
        for a in np.flatnonzero(pos[b] == 0):
            e = a + 1
            while e < T and pos[b, e] != 0:
                e += 1
            alone, _ = _attention.forward(*(np.ascontiguousarray(x[b:b + 1, a:e]) for x in (q, k, v)), H)
            np.testing.assert_allclose(out[b:b + 1, a:e], alone, rtol=1e-12, atol=1e-12)


def test_gradients_through_the_op_match_finite_differences(rng, path):
    B, T, H, hd = 2, 11, 2, 3
    starts = _attention.segment_starts(_positions(rng, B, T), (B, T))
    arrays = [rng.standard_normal((B, T, H * hd)) for _ in range(3)]
    w = rng.standard_normal((B, T, H * hd))

    def f():
        return float((ops.causal_attention(*map(Tensor, arrays), H, segment_starts=starts).data * w).sum())

    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    (ops.causal_attention(*tensors, H, segment_starts=starts) * Tensor(w)).sum().backward()
    for t, a in zip(tensors, arrays):
        np.testing.assert_allclose(t.grad, numerical_grad(f, a), rtol=1e-5, atol=1e-7)


def test_positions_must_count_within_records():
    assert _attention.segment_starts(np.array([[0, 1, 2, 0, 1, 0]]), (1, 6)).tolist() == [[0, 0, 0, 3, 3, 5]]
    for bad in ([[0, 2, 3, 0, 1, 0]], [[1, 2, 3, 4, 5, 6]], [[0, 1, -1, 0, 1, 2]]):
        with pytest.raises(ValueError, match="position_ids must count 0, 1, 2"):
            _attention.segment_starts(np.array(bad), (1, 6))
    with pytest.raises(ValueError, match="shape"):
        _attention.segment_starts(np.zeros((1, 5), int), (1, 6))
    for bad in ([[0, 2, 1, 3]], [[0, 0, 2, 1]]):  # past the token; going back
        with pytest.raises(ValueError, match="segment starts must satisfy"):
            ops.causal_attention(*(Tensor(np.zeros((1, 4, 4))) for _ in range(3)), 2, segment_starts=np.array(bad))

"""The graph keeps what the backward rules need and nothing else (fastlora.autograd.tensor._Node):
an intermediate's data goes with its Tensor unless a rule kept it, the gradients stay the same,
and a graph freed by one backward refuses a second."""
import gc
import weakref

import numpy as np
import pytest

import fastlora as fl
from fastlora.autograd import ops
from fastlora.nn import Parameter


def _freed(build):
    """build() -> (output Tensor, the intermediate Tensor); whether the intermediate's data is
    gone once the caller drops the Tensor, and the output for a backward."""
    out, hidden = build()
    data = weakref.ref(hidden.data)
    del hidden
    gc.collect()
    return data() is None, out


def test_a_frozen_linear_lets_its_input_go(rng):
    x = Parameter(rng.standard_normal((3, 4)))
    frozen = Parameter(rng.standard_normal((5, 4)), requires_grad=False)
    trained = Parameter(rng.standard_normal((5, 4)))

    freed, out = _freed(lambda: (lambda h: (ops.linear(h, frozen), h))(ops.gelu(x)))
    assert freed  # the frozen weight needs no input, and gelu's rule keeps x, not its output
    out.sum().backward()  # d/dx sum(gelu(x) W^T) = gelu'(x) * W.sum(0)
    dout = np.broadcast_to(frozen.data.sum(0), (3, 4)).copy()
    np.testing.assert_allclose(x.grad, fl.kernels.gelu_backward(dout, x.data), rtol=1e-12)

    freed, out = _freed(lambda: (lambda h: (ops.linear(h, trained), h))(ops.gelu(x)))
    assert not freed  # a trained weight's gradient needs the input


def test_rope_keeps_nothing_of_its_input(rng):
    x = Parameter(rng.standard_normal((1, 3, 8)))
    cos, sin = np.cos(np.ones((3, 2))), np.sin(np.ones((3, 2)))
    freed, out = _freed(lambda: (lambda h: (ops.rope(h, cos, sin, 2), h))(x * 2.0))
    assert freed
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("keep", [True, False])
def test_attention_probabilities_made_again_give_the_same_gradients(rng, monkeypatch, keep):
    """Above KEEP_ATTENTION_PROBS_BYTES the backward makes the probabilities again: the same
    gradients as keeping them."""
    q, k, v = (Parameter(rng.standard_normal((2, 6, 8))) for _ in range(3))
    k2, v2 = (Parameter(rng.standard_normal((2, 6, 4))) for _ in range(2))
    w = rng.standard_normal((2, 6, 8))
    grads = []
    for limit in (1 << 40, 0):
        monkeypatch.setattr(ops, "KEEP_ATTENTION_PROBS_BYTES", limit)
        for t in (q, k, v, k2, v2):
            t.grad = None
        (ops.causal_attention(q, k, v, 2) * w).sum().backward()
        (ops.causal_attention(q, k2, v2, 2, num_kv_heads=1) * w).sum().backward()
        grads.append([t.grad.copy() for t in (q, k, v, k2, v2)])
    for kept, remade in zip(*grads):
        np.testing.assert_array_equal(kept, remade)


def test_a_model_step_frees_the_frozen_layers_inputs():
    """A LoRA GPT's graph after the forward: far less than every intermediate of every block."""
    import tracemalloc
    model = fl.GPT(vocab_size=50, embed_dim=64, num_heads=4, num_layers=2, max_seq_len=32, seed=0)
    lm = fl.LoRAModel(model, target_modules=["q_proj", "v_proj"], rank=4, alpha=8)
    lm.inject_lora()
    ids = np.random.default_rng(0).integers(0, 50, size=(4, 32))
    lm.loss(ids, ids).backward()
    tracemalloc.start()
    try:
        loss = lm.loss(ids, ids)
        live, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    row = 4 * 32 * 64 * 4  # one (B, T, D) float32 array
    # kept per block: the block input, ln1's output (LoRA's input), q, k, v, the attention
    # probabilities (4 heads x 32 x 32 per row: 2 rows' worth), the residual after attention,
    # fc1's output (GELU's input, 4 rows' worth): about 13 rows. Everything: about 30 rows
    assert live < 2 * 16 * row, live / row
    loss.backward()


def test_a_second_backward_through_a_freed_graph_is_refused(rng):
    x = Parameter(rng.standard_normal(3))
    y = ops.gelu(x)
    a, b = (y * 2.0).sum(), (y * 3.0).sum()
    a.backward()
    with pytest.raises(RuntimeError, match="already used and freed"):
        b.backward()

"""Building-block layers: Linear, Embedding, LayerNorm, Dropout, and the GELU MLP."""
import math

import numpy as np

from fastlora.autograd import ops
from fastlora.nn.module import Module, Parameter


class Linear(Module):
    """y = x @ weight.T + bias; weight (out_features, in_features) as in PyTorch."""

    def __init__(self, in_features, out_features, bias=True, rng=None, dtype=np.float32, std=0.02):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = Parameter(rng.normal(0.0, std, (out_features, in_features)).astype(dtype))
        self.bias = Parameter(np.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """Lookup table weight (num_embeddings, embedding_dim)."""

    def __init__(self, num_embeddings, embedding_dim, rng=None, dtype=np.float32, std=0.02):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.weight = Parameter(rng.normal(0.0, std, (num_embeddings, embedding_dim)).astype(dtype))

    def forward(self, ids):
        return ops.embedding(ids, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    def __init__(self, dim, eps=1e-5, dtype=np.float32):
        super().__init__()
        self.eps = float(eps)
        self.weight = Parameter(np.ones(dim, dtype=dtype))
        self.bias = Parameter(np.zeros(dim, dtype=dtype))

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Dropout(Module):
    """Inverted dropout with its own Generator (checkpoints save its state, so resumes are exact)."""

    def __init__(self, p=0.0, seed=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = np.random.default_rng(seed)

    def forward(self, x):
        return ops.dropout(x, self.p, self.training, self.rng)

    def extra_repr(self):
        return f"p={self.p}"


# activation name -> ops.gelu's `approximate` (the names are Hugging Face GPT-2's, minus aliases)
ACTIVATIONS = {"gelu_tanh": "tanh", "gelu": "none"}


class MLP(Module):
    """fc1 (D -> hidden_dim, default mlp_ratio * D), GELU (tanh, or exact erf), fc2 back to D."""

    def __init__(self, dim, mlp_ratio=4, rng=None, dtype=np.float32, proj_std=0.02, hidden_dim=None,
                 activation="gelu_tanh"):
        super().__init__()
        hidden = hidden_dim or mlp_ratio * dim
        self.approximate = ACTIVATIONS[activation]
        self.fc1 = Linear(dim, hidden, rng=rng, dtype=dtype)
        self.fc2 = Linear(hidden, dim, rng=rng, dtype=dtype, std=proj_std)

    def forward(self, x):
        return self.fc2(ops.gelu(self.fc1(x), approximate=self.approximate))


def residual_std(num_layers, std=0.02):
    """GPT-2's init for projections into the residual stream: std / sqrt(2 * layers)."""
    return std / math.sqrt(2 * max(num_layers, 1))

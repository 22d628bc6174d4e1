"""Tensor: an ndarray with a gradient, and the reverse-mode engine that fills it.

A Tensor made by an op remembers its parents and a `backward` rule mapping the gradient of
the output to the gradients of the parents (a tuple, None where a parent needs none). Leaf
tensors that require grad accumulate into `.grad` (+=); one `zero_grad` clears them.

The graph is made of `_Node`s, apart from the Tensors' data: an op's output Tensor points to
its node, and the nodes of the ops that use it point to that node, not to the Tensor. So an
intermediate's data lives only as long as the Tensor itself or a backward rule that kept it
(as PyTorch's saved tensors): the input of a frozen Linear, say, is freed as soon as the
forward moves on, where a graph of Tensors held every intermediate until the backward.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import numpy as np

from fastlora._runtime import blas as _blas
from fastlora._typing import ArrayLike, DTypeLike

_grad_enabled = True


def is_grad_enabled() -> bool:
    return _grad_enabled


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Within this block ops record no graph: no gradients, no memory held for backward."""
    global _grad_enabled
    previous = _grad_enabled
    _grad_enabled = False
    try:
        yield
    finally:
        _grad_enabled = previous


def _as_array(data, dtype):
    if isinstance(data, Tensor):
        data = data.data
    if dtype is not None:
        return np.asarray(data, dtype=dtype)
    arr = np.asarray(data)
    if arr.dtype.kind in "fc":
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float32)
        return arr
    if isinstance(data, np.ndarray) or arr.dtype.kind in "iub":
        return arr  # integer data (token ids) keeps its type
    return arr.astype(np.float32)


class Tensor:
    """An ndarray `.data` plus `.grad` (an ndarray of the same shape, or None)."""

    __slots__ = ("data", "grad", "requires_grad", "_node", "__weakref__")
    __array_priority__ = 1000  # make ndarray + Tensor dispatch to Tensor.__radd__

    def __init__(self, data: ArrayLike, requires_grad: bool = False, dtype: DTypeLike = None) -> None:
        self.data = _as_array(data, dtype)
        if requires_grad and self.data.dtype.kind != "f":
            raise TypeError(f"only floating tensors can require grad, got dtype {self.data.dtype}")
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None

    # the graph: a leaf is its own node; an op's output delegates to the _Node it made
    @property
    def _parents(self):
        return () if self._node is None else self._node._parents

    @property
    def _backward(self):
        return None if self._node is None else self._node._backward

    @_backward.setter
    def _backward(self, rule):  # wrapping an op's rule (bench/profile_step.py)
        self._node._backward = rule

    # --- array-like surface ------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)
    ndim = property(lambda self: self.data.ndim)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({np.array2string(self.data, threshold=8)}, dtype={self.dtype}{flag})"

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        return Tensor(self.data)

    def zero_grad(self) -> None:
        self.grad = None

    # --- the engine ----------------------------------------------------------------------
    def backward(self, grad: Optional[ArrayLike] = None) -> None:
        """Reverse-mode sweep from this tensor; leaves that require grad accumulate into .grad."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(was it computed under no_grad, or from frozen parameters only?)")
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward() without a gradient needs a scalar, got shape {self.shape}")
            grad = np.ones_like(self.data)
        else:
            grad = np.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"grad must have shape {self.shape}, got {grad.shape}")

        with _blas.kept():  # NumPy's BLAS keeps the caller's thread count (fastlora._runtime.blas)
            self._sweep(grad)

    def _sweep(self, grad):
        start = self if self._node is None else self._node
        order = _topological_order(start)
        grads = {id(start): grad}
        for node in order:
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._backward is None:  # a leaf
                if isinstance(node, _Node):
                    raise RuntimeError("backward() through a part of the graph that an earlier backward() "
                                       "already used and freed: compute the loss again for another backward")
                if node.grad is None:
                    # copy: an op may hand the same array to several parents
                    node.grad = np.array(g, dtype=node.data.dtype, copy=True)
                else:
                    node.grad += g
                continue
            for parent, pg in zip(node._parents, node._backward(g)):
                if pg is None or not parent.requires_grad:
                    continue
                key = id(parent)
                if key in grads:
                    grads[key] = grads[key] + pg
                else:
                    grads[key] = pg
            # free the graph as we go so intermediates can be released
            node._parents = ()
            node._backward = None

    # --- operators (rules live in fastlora.autograd.ops) -----------------------------------
    def __add__(self, other):
        from fastlora.autograd.ops import add
        return add(self, other)

    __radd__ = __add__

    def __sub__(self, other):
        from fastlora.autograd.ops import add, neg
        return add(self, neg(_lift(other, self)))

    def __rsub__(self, other):
        from fastlora.autograd.ops import add, neg
        return add(_lift(other, self), neg(self))

    def __mul__(self, other):
        from fastlora.autograd.ops import mul
        return mul(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        from fastlora.autograd.ops import mul
        if isinstance(other, Tensor):
            raise TypeError("division by a Tensor is not supported; multiply by a constant instead")
        return mul(self, 1.0 / other)

    def __neg__(self):
        from fastlora.autograd.ops import neg
        return neg(self)

    def __matmul__(self, other):
        from fastlora.autograd.ops import matmul
        return matmul(self, other)

    def __rmatmul__(self, other):
        from fastlora.autograd.ops import matmul
        return matmul(other, self)

    def sum(self, axis=None, keepdims=False):
        from fastlora.autograd.ops import sum as sum_
        return sum_(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        from fastlora.autograd.ops import mean
        return mean(self, axis, keepdims)

    def reshape(self, *shape):
        from fastlora.autograd.ops import reshape
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return reshape(self, shape)

    def transpose(self, *axes):
        from fastlora.autograd.ops import transpose
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return transpose(self, axes or None)

    @property
    def T(self):
        return self.transpose()


def _lift(x, like):
    """Wrap a constant as a Tensor of `like`'s float dtype (constants never require grad)."""
    if isinstance(x, Tensor):
        return x
    return Tensor(np.asarray(x, dtype=like.dtype))


def _topological_order(root):
    """Nodes reachable from root, each after every node that uses it (iterative: deep graphs are fine)."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for parent in node._parents:
            if parent.requires_grad and id(parent) not in seen:
                stack.append((parent, False))
    order.reverse()
    return order


class _Node:
    """An op's place in the graph: its parents' nodes (a leaf parent is the Tensor itself) and
    its backward rule; the engine walks these, never the outputs' data."""

    __slots__ = ("_parents", "_backward", "requires_grad", "__weakref__")

    def __init__(self, parents, backward):
        self._parents = tuple(p if p._node is None else p._node for p in parents)
        self._backward = backward
        self.requires_grad = True


def make_result(data, parents, backward):
    """Wrap an op's output; record `backward` only when grad is on and some parent needs it."""
    out = Tensor.__new__(Tensor)
    out.data = data
    out.grad = None
    out._node = None
    out.requires_grad = False
    _blas.settle()  # a bare op gives NumPy's BLAS back the caller's thread count
    if _grad_enabled:
        for p in parents:
            if p.requires_grad:
                out.requires_grad = True
                out._node = _Node(parents, backward)
                break
    return out

"""The optimizer base: parameter groups, zero_grad, and a pickle-free state_dict.

Parameters are fastlora Tensors (normally nn.Parameter). They are numbered 0, 1, ... in the
order given, group after group; that index names their state in state_dict() ("3.exp_avg").
`param_groups` is a list of dicts as in torch.optim, so `optimizer.param_groups[0]["lr"]`
reads and sets the learning rate (and `optimizer.lr` does the same for every group).

state_dict() layout (JSON-able except for the ndarrays under "state"; see fastlora.optim.state):

    {"type": "AdamW", "format": 1, "step": 12,
     "param_groups": [{"lr": 0.001, "betas": [0.9, 0.999], ..., "params": [0, 1, 2]}],
     ...subclass JSON fields ("param_steps" for AdamW)...,
     "state": {"0.exp_avg": ndarray, "0.exp_avg_sq": ndarray, ...}}
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from fastlora.autograd import Tensor
from fastlora.checks import check_int, check_real

FORMAT = 1
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# keys the optimizer tolerates in a group besides its hyper-parameters: the schedule stores
# each group's base learning rate under "initial_lr", as torch's schedulers do
_GROUP_EXTRAS = ("params", "initial_lr")


class Optimizer:
    """Subclasses define HYPER (hyper-parameter names), STATE_ARRAYS (per-parameter array
    names), check_hyper(values, where, step_time) and _update(index, param, flat data, flat
    grad, checked hyper-parameters of its group)."""

    HYPER = ()
    STATE_ARRAYS = ()

    def __init__(self, params, defaults):
        self.defaults = self.check_hyper(defaults, "")
        self.param_groups = []
        self._params = []          # every parameter, by index
        self._group_ranges = []    # (first index, end index) of each group
        seen = {}
        groups, explicit = _as_groups(params)
        for gi, group in enumerate(groups):
            where = f"param group {gi}: " if explicit else ""
            unknown = [k for k in group if k not in self.HYPER and k not in _GROUP_EXTRAS]
            if unknown:
                raise ValueError(f"{where}unknown option(s) {unknown}; "
                                 f"{type(self).__name__} takes {list(self.HYPER)}")
            hyper = self.check_hyper({**self.defaults, **{k: v for k, v in group.items()
                                                           if k in self.HYPER}}, where)
            members = _as_param_list(group["params"], where)
            start = len(self._params)
            for j, p in enumerate(members):
                _check_param(p, f"{where}params[{j}]")
                if id(p) in seen:
                    raise ValueError(f"{where}params[{j}] is the same parameter as parameter "
                                     f"{seen[id(p)]}; each parameter may appear only once")
                seen[id(p)] = start + j
                self._params.append(p)
            self._group_ranges.append((start, len(self._params)))
            extras = {k: v for k, v in group.items() if k in _GROUP_EXTRAS and k != "params"}
            self.param_groups.append({"params": members, **hyper, **extras})
        self._state = [{} for _ in self._params]
        self._step_count = 0

    # --- learning rate ---------------------------------------------------------------------
    @property
    def lr(self):
        """The first group's learning rate; setting it sets every group's."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value):
        value = check_real("lr", value, low=0.0)
        for group in self.param_groups:
            group["lr"] = value

    @property
    def step_count(self):
        """How many times step() has run."""
        return self._step_count

    # --- the loop --------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every gradient: to None (the default, as torch), or to zeros in place."""
        for p in self._params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad[...] = 0

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Update every parameter that has a gradient; parameters whose grad is None are skipped.

        closure, when given, is called first and its result (the loss) returned, as in torch.
        """
        loss = closure() if closure is not None else None
        # check every group and gradient before touching anything, so that a bad one
        # (a wrong shape, a negative lr) fails the step without half of it applied
        work = []
        for gi, group in enumerate(self.param_groups):
            where = f"param_groups[{gi}]: " if len(self.param_groups) > 1 else ""
            # a schedule or a user may have written new values into the group since last time
            hyper = self.check_hyper({k: group[k] for k in self.HYPER}, where, step_time=True)
            start, end = self._group_ranges[gi]
            for i in range(start, end):
                p = self._params[i]
                if p.grad is not None:
                    work.append((i, p, hyper) + _flat_operands(i, p))
        for i, p, hyper, data, grad, writeback in work:
            self._update(i, p, data, grad, hyper)
            if writeback is not None:
                p.data[...] = writeback
        self._step_count += 1
        return loss

    def _buffer(self, i, name, data):
        """State array `name` of parameter i, flat (N,) in data's dtype (created zeroed).

        Buffers are kept flat so the kernels take them without a reshape on every step;
        state_dict() gives them the parameter's shape.
        """
        state = self._state[i]
        buf = state.get(name)
        if buf is None:
            buf = state[name] = np.zeros(data.size, dtype=data.dtype)
        elif buf.dtype != data.dtype:
            # the model was cast (Module.to_dtype) after the optimizer was built: follow it,
            # as torch casts loaded state to the parameter's dtype
            buf = state[name] = buf.astype(data.dtype)
        return buf

    # --- state --------------------------------------------------------------------------------
    def state_dict(self):
        """A snapshot (arrays are copies): JSON-able fields plus {"i.name": ndarray} under "state"."""
        groups = []
        for (start, end), group in zip(self._group_ranges, self.param_groups):
            hyper = self.check_hyper({k: group[k] for k in self.HYPER}, "", step_time=True)
            groups.append({**_jsonable(hyper), "params": list(range(start, end))})
        arrays = {}
        for i, state in enumerate(self._state):
            for name in self.STATE_ARRAYS:
                if name in state:
                    arrays[f"{i}.{name}"] = state[name].reshape(self._params[i].shape).copy()
        return {"type": type(self).__name__, "format": FORMAT, "step": self._step_count,
                "param_groups": groups, **self._extra_state(), "state": arrays}

    def load_state_dict(self, state_dict):
        """Restore hyper-parameters, step counts and buffers. Everything is checked first (shapes,
        dtypes, keys, group layout); on error nothing is changed and the message names the key."""
        sd = state_dict
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
        name = type(self).__name__
        if sd.get("type") != name:
            raise ValueError(f"state_dict['type'] is {sd.get('type')!r}; this optimizer is {name}")
        if sd.get("format") != FORMAT:
            raise ValueError(f"state_dict['format'] is {sd.get('format')!r}; "
                             f"this version reads format {FORMAT}")
        step = check_int("state_dict['step']", sd.get("step"), low=0)
        groups = sd.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict['param_groups'] must be a list of "
                             f"{len(self.param_groups)} group(s), got {_describe(groups)}")
        new_hyper = []
        for gi, (group, (start, end)) in enumerate(zip(groups, self._group_ranges)):
            where = f"state_dict['param_groups'][{gi}]"
            if not isinstance(group, dict):
                raise TypeError(f"{where} must be a dict, got {type(group).__name__}")
            if list(group.get("params", ())) != list(range(start, end)):
                raise ValueError(f"{where}['params'] must be {list(range(start, end))} (this "
                                 f"optimizer's parameter indices), got {group.get('params')!r}")
            missing = [k for k in self.HYPER if k not in group]
            if missing:
                raise ValueError(f"{where} lacks {missing}")
            new_hyper.append(self.check_hyper({k: group[k] for k in self.HYPER}, where + ": ",
                                              step_time=True))
        arrays = sd.get("state", {})
        if not isinstance(arrays, dict):
            raise TypeError(f"state_dict['state'] must be a dict, got {type(arrays).__name__}")
        new_state = [{} for _ in self._params]
        for key, value in arrays.items():
            i, aname = self._parse_key(key)
            p = self._params[i]
            if not isinstance(value, np.ndarray):
                raise TypeError(f"state_dict['state'][{key!r}] must be a numpy.ndarray, "
                                f"got {type(value).__name__}")
            if value.shape != p.shape:
                raise ValueError(f"state_dict['state'][{key!r}] has shape {value.shape}; "
                                 f"parameter {i} has shape {p.shape}")
            if value.dtype.kind != "f":
                raise TypeError(f"state_dict['state'][{key!r}] must be floating, got {value.dtype}")
            # a copy in the parameter's dtype, so the loaded dict stays independent of the optimizer
            new_state[i][aname] = np.array(value, dtype=p.dtype, order="C", copy=True).reshape(-1)
        self._load_extra(sd, new_state, new_hyper)  # checks and fills subclass fields
        # everything checked: commit
        for group, hyper in zip(self.param_groups, new_hyper):
            group.update(hyper)
        self._state = new_state
        self._step_count = step

    def _parse_key(self, key):
        index, _, aname = str(key).partition(".")
        if not index.isdigit() or aname not in self.STATE_ARRAYS:
            raise ValueError(f"state_dict['state'] has unknown key {key!r}; keys are "
                             f"'<parameter index>.<name>' with name in {list(self.STATE_ARRAYS)}")
        i = int(index)
        if i >= len(self._params):
            raise ValueError(f"state_dict['state'] key {key!r} names parameter {i}; this optimizer "
                             f"has {len(self._params)} parameters (0..{len(self._params) - 1})")
        return i, aname

    # --- subclass hooks ---------------------------------------------------------------------
    def check_hyper(self, values, where, step_time=False):
        raise NotImplementedError

    def _update(self, i, p, data, grad, hyper):
        raise NotImplementedError

    def _extra_state(self):
        return {}

    def _load_extra(self, sd, new_state, new_hyper):
        pass

    def __repr__(self):
        lines = [f"{type(self).__name__}("]
        for gi, group in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={group[k]}" for k in self.HYPER)
            lines.append(f"  group {gi}: {len(group['params'])} parameters, {hyper}")
        return "\n".join(lines) + "\n)"


# --- helpers -------------------------------------------------------------------------------------

def _as_groups(params):
    """(list of group dicts, whether the caller gave dicts); one group for a plain iterable."""
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of Parameters (e.g. model.parameters()), "
                        "got a single Tensor; wrap it in a list")
    if isinstance(params, (dict, np.ndarray, str, bytes)):
        raise TypeError(f"params must be an iterable of Parameters or of parameter-group "
                        f"dicts, got {type(params).__name__}")
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"params must be an iterable of Parameters, got "
                        f"{type(params).__name__}") from None
    if not items:
        raise ValueError("params is empty: the optimizer got no parameters (an exhausted "
                         "generator, or a model with nothing trainable?)")
    kinds = {isinstance(x, dict) for x in items}
    if kinds == {True}:
        for gi, group in enumerate(items):
            if "params" not in group:
                raise ValueError(f"param group {gi} has no 'params' key")
        return [dict(g) for g in items], True
    if kinds == {True, False}:
        raise TypeError("params mixes Parameters and parameter-group dicts; pass one kind")
    return [{"params": items}], False


def _as_param_list(params, where):
    if isinstance(params, Tensor):
        return [params]
    try:
        members = list(params)
    except TypeError:
        raise TypeError(f"{where}params must be an iterable of Parameters, got "
                        f"{type(params).__name__}") from None
    if not members:
        raise ValueError(f"{where}params is empty")
    return members


def _check_param(p, where):
    if not isinstance(p, Tensor):
        raise TypeError(f"{where} must be a fastlora Parameter (or Tensor), got {type(p).__name__}")
    if p.data.dtype not in _FLOATS:
        raise TypeError(f"{where} has dtype {p.data.dtype}; the optimizers update float32 and "
                        f"float64 parameters")


def _flat_operands(i, p):
    """(flat param data, flat grad, contiguous copy to write back or None) for parameter i."""
    data, grad = p.data, p.grad
    if isinstance(grad, np.ndarray) and grad.dtype is data.dtype and grad.shape == data.shape \
            and grad.flags.c_contiguous and data.flags.c_contiguous and data.flags.writeable:
        return data.reshape(-1), grad.reshape(-1), None  # the common case, checked cheaply
    if not isinstance(grad, np.ndarray) or grad.shape != data.shape:
        raise ValueError(f"parameter {i} has shape {data.shape} but its grad is "
                         f"{_describe(grad)}")
    if data.dtype not in _FLOATS:
        raise TypeError(f"parameter {i} has dtype {data.dtype}; the optimizers update float32 "
                        f"and float64 parameters")
    if not data.flags.writeable:
        raise ValueError(f"parameter {i}'s data is read-only; the optimizer updates it in place")
    grad = np.ascontiguousarray(grad, dtype=data.dtype).reshape(-1)
    if data.flags.c_contiguous:
        return data.reshape(-1), grad, None
    work = np.ascontiguousarray(data)
    return work.reshape(-1), grad, work


def _jsonable(hyper):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hyper.items()}


def _describe(x):
    if isinstance(x, np.ndarray):
        return f"an array of shape {x.shape}"
    if isinstance(x, list):
        return f"a list of {len(x)}"
    return repr(x) if x is None else type(x).__name__

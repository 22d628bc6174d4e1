"""WarmupCosineSchedule: linear warmup, then cosine decay to a floor, written into the optimizer.

For update number s (0-based; the schedule sets the rate the next optimizer.step() uses):

    s <  warmup_steps:  factor = (s + 1) / (warmup_steps + 1)
    s >= warmup_steps:  progress = min(1, (s - warmup_steps) / max(1, total_steps - warmup_steps))
                        factor = min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * progress)) / 2

and each group's lr = its base lr * factor. The warmup starts above zero (nanoGPT's form), so
the first update is never wasted at lr = 0; the peak comes at s = warmup_steps; from
s = total_steps on, the rate stays at the floor (base * min_lr_ratio).

Use it like torch's schedulers: build it after the optimizer, call optimizer.step() and then
schedule.step() once per update. The base lr of each group is kept under "initial_lr" in the
group (as torch does), so a second schedule on the same optimizer starts from the same base.
"""
from __future__ import annotations

import math
from typing import Any

from fastlora.checks import check_int, check_real


class WarmupCosineSchedule:
    """WarmupCosineSchedule(optimizer, warmup_steps, total_steps, min_lr_ratio=0.0)."""

    def __init__(self, optimizer: Any, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, list) or not groups or \
                not all(isinstance(g, dict) and "lr" in g for g in groups):
            raise TypeError(f"optimizer must have param_groups (a list of dicts with 'lr'), "
                            f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.warmup_steps, self.total_steps, self.min_lr_ratio = _check_shape(
            warmup_steps, total_steps, min_lr_ratio, "")
        for group in groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [check_real(f"param_groups[{gi}]['initial_lr']", g["initial_lr"], low=0.0)
                         for gi, g in enumerate(groups)]
        self.last_step = 0  # updates taken so far; the rate now set is for update last_step
        self._apply()

    def factor(self, step):
        """The multiplier of the base lr for update number `step` (0-based)."""
        step = check_int("step", step, low=0)
        if step >= self.total_steps:  # checked first: with warmup == total there is no decay
            return self.min_lr_ratio
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.min_lr_ratio
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr_at(self, step, group=0):
        """The lr that group `group` uses for update number `step`."""
        return self.base_lrs[group] * self.factor(step)

    def get_lr(self):
        """The lr the next update of the first group uses (what the optimizer holds now)."""
        return self.lr_at(self.last_step)

    def get_last_lr(self):
        """Every group's current lr, as torch's schedulers return it."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self) -> None:
        """Advance to the next update and write its lr into the optimizer."""
        self.last_step += 1
        self._apply()

    def _apply(self):
        factor = self.factor(self.last_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def state_dict(self):
        """Plain JSON-able data (no arrays)."""
        return {"type": type(self).__name__, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "min_lr_ratio": self.min_lr_ratio,
                "base_lrs": list(self.base_lrs), "last_step": self.last_step}

    def load_state_dict(self, state_dict):
        """Restore the position and shape of the schedule and rewrite the optimizer's lr.
        Everything is checked first; on error nothing changes."""
        sd = state_dict
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
        if sd.get("type") != type(self).__name__:
            raise ValueError(f"state_dict['type'] is {sd.get('type')!r}; "
                             f"this is a {type(self).__name__}")
        missing = [k for k in ("warmup_steps", "total_steps", "min_lr_ratio", "base_lrs",
                               "last_step") if k not in sd]
        if missing:
            raise ValueError(f"state_dict lacks {missing}")
        shape = _check_shape(sd["warmup_steps"], sd["total_steps"], sd["min_lr_ratio"],
                             "state_dict: ")
        groups = self.optimizer.param_groups
        base = sd["base_lrs"]
        if not isinstance(base, list) or len(base) != len(groups):
            raise ValueError(f"state_dict['base_lrs'] must be a list of {len(groups)} lr(s), "
                             f"one per parameter group, got {base!r:.80}")
        base = [check_real(f"state_dict['base_lrs'][{i}]", b, low=0.0) for i, b in enumerate(base)]
        last = check_int("state_dict['last_step']", sd["last_step"], low=0)
        self.warmup_steps, self.total_steps, self.min_lr_ratio = shape
        self.base_lrs, self.last_step = base, last
        for group, b in zip(groups, base):
            group["initial_lr"] = b
        self._apply()

    def __repr__(self):
        return (f"WarmupCosineSchedule(warmup_steps={self.warmup_steps}, total_steps="
                f"{self.total_steps}, min_lr_ratio={self.min_lr_ratio}, last_step={self.last_step})")


def _check_shape(warmup_steps, total_steps, min_lr_ratio, where):
    total = check_int(where + "total_steps", total_steps, low=1)
    warmup = check_int(where + "warmup_steps", warmup_steps, low=0)
    if warmup > total:
        raise ValueError(f"{where}warmup_steps must be <= total_steps ({total}), got {warmup}")
    floor = check_real(where + "min_lr_ratio", min_lr_ratio, low=0.0, high=1.0)
    return warmup, total, floor

"""WarmupCosineSchedule: its values at the landmarks, its effect on the optimizer, and checks."""
import math

import numpy as np
import pytest

from fastlora.nn import Parameter
from fastlora.optim import SGD, AdamW, WarmupCosineSchedule


def _opt(lr=1.0, cls=SGD):
    return cls([Parameter(np.zeros(2))], lr=lr)


def test_landmarks():
    opt = _opt(lr=2.0)
    s = WarmupCosineSchedule(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    # warmup: (s + 1) / (warmup + 1), never zero
    assert [s.lr_at(i) for i in range(4)] == pytest.approx([0.4, 0.8, 1.2, 1.6])
    assert s.lr_at(4) == pytest.approx(2.0)                       # peak right after warmup
    assert s.lr_at(9) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))   # half way: the midpoint
    assert s.lr_at(14) == pytest.approx(0.2)                      # the floor at total_steps
    assert s.lr_at(100) == pytest.approx(0.2)                     # and after it
    lrs = [s.lr_at(i) for i in range(4, 15)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))               # strictly decaying
    expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 10))
    assert s.factor(7) == pytest.approx(expected, rel=1e-15)


def test_drives_the_optimizer_like_torch_schedulers():
    opt = _opt(lr=1.0)
    s = WarmupCosineSchedule(opt, warmup_steps=1, total_steps=3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # set for the first update already
    assert s.get_lr() == pytest.approx(0.5) and s.get_last_lr() == [pytest.approx(0.5)]
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        s.step()
    assert seen == pytest.approx([0.5, 1.0, 0.5, 0.0, 0.0])
    assert s.last_step == 5
    p = opt.param_groups[0]["params"][0]
    p.grad = np.ones(2)
    opt.step()  # lr 0 at the floor is allowed (the constructor wants > 0, a schedule may reach 0)
    np.testing.assert_array_equal(p.data, np.zeros(2))


def test_no_warmup_and_all_warmup():
    s = WarmupCosineSchedule(_opt(), warmup_steps=0, total_steps=2)
    assert [s.lr_at(i) for i in range(3)] == pytest.approx([1.0, 0.5, 0.0])
    s = WarmupCosineSchedule(_opt(), warmup_steps=2, total_steps=2, min_lr_ratio=0.25)
    assert [s.lr_at(i) for i in range(4)] == pytest.approx([1 / 3, 2 / 3, 0.25, 0.25])


def test_groups_keep_their_ratio_and_a_second_schedule_keeps_the_base():
    a, b = Parameter(np.zeros(1)), Parameter(np.zeros(1))
    opt = AdamW([{"params": [a]}, {"params": [b], "lr": 0.1}], lr=1.0)
    s = WarmupCosineSchedule(opt, warmup_steps=0, total_steps=4)
    s.step()
    lrs = s.get_last_lr()
    assert lrs[1] == pytest.approx(lrs[0] * 0.1)
    again = WarmupCosineSchedule(opt, warmup_steps=0, total_steps=4)  # base from "initial_lr"
    assert again.base_lrs == [1.0, 0.1]


def test_state_round_trip():
    opt = _opt(lr=3.0)
    s = WarmupCosineSchedule(opt, warmup_steps=2, total_steps=9, min_lr_ratio=0.05)
    for _ in range(5):
        s.step()
    other_opt = _opt(lr=7.0)
    t = WarmupCosineSchedule(other_opt, warmup_steps=0, total_steps=1)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    assert other_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for _ in range(3):
        s.step()
        t.step()
        assert other_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(warmup_steps=-1, total_steps=10), ValueError, r"warmup_steps must be >= 0, got -1"),
    (dict(warmup_steps=11, total_steps=10), ValueError, r"warmup_steps must be <= total_steps \(10\)"),
    (dict(warmup_steps=0, total_steps=0), ValueError, r"total_steps must be >= 1, got 0"),
    (dict(warmup_steps=1.5, total_steps=10), TypeError, r"warmup_steps must be an int"),
    (dict(warmup_steps=1, total_steps=10, min_lr_ratio=-0.1), ValueError, r"min_lr_ratio must be"),
    (dict(warmup_steps=1, total_steps=10, min_lr_ratio=1.1), ValueError, r"<= 1.0, got 1.1"),
])
def test_bad_arguments(kwargs, exc, match):
    opt = _opt(lr=0.5)
    with pytest.raises(exc, match=match):
        WarmupCosineSchedule(opt, **kwargs)
    assert opt.param_groups[0]["lr"] == 0.5 and "initial_lr" not in opt.param_groups[0]


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="optimizer must have param_groups"):
        WarmupCosineSchedule(object(), 1, 10)
    with pytest.raises(ValueError, match="step must be >= 0"):
        WarmupCosineSchedule(_opt(), 1, 10).lr_at(-1)

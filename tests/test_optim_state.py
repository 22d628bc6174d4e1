"""Optimizer and schedule state: pickle-free round trips (JSON + safetensors), exact resume,
and loads that refuse bad input by name and change nothing."""
import copy
import json

import numpy as np
import pytest

from fastlora.nn import Parameter
from fastlora.optim import SGD, AdamW, WarmupCosineSchedule, join_state, split_state

SHAPES = [(4, 3), (5,), (2, 2, 2)]


def _params(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]


def _grads(step, dtype=np.float32):
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def _train(params, opt, sched, steps, start=0):
    for t in range(start, start + steps):
        for i, (p, g) in enumerate(zip(params, _grads(t))):
            p.grad = None if (i == 2 and t < 2) else g  # parameter 2 starts late
        opt.step()
        sched.step()


MAKERS = {
    "adamw": lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1),
    "sgd": lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_resume_through_json_and_safetensors_is_exact(tmp_path, kind):
    """Train 7 steps straight, or 4 + save + a fresh process-like rebuild + 3: same weights, bitwise."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    straight = _params()
    opt = MAKERS[kind](straight)
    sched = WarmupCosineSchedule(opt, warmup_steps=2, total_steps=7, min_lr_ratio=0.1)
    _train(straight, opt, sched, 7)

    first = _params()
    opt = MAKERS[kind](first)
    sched = WarmupCosineSchedule(opt, warmup_steps=2, total_steps=7, min_lr_ratio=0.1)
    _train(first, opt, sched, 4)
    meta, arrays = split_state(opt.state_dict(), prefix="optimizer.")
    weights = {f"model.{i}": p.data for i, p in enumerate(first)}
    safetensors_numpy.save_file({**weights, **arrays}, str(tmp_path / "ckpt.safetensors"))
    (tmp_path / "ckpt.json").write_text(json.dumps({"optimizer": meta,
                                                     "schedule": sched.state_dict()}))

    loaded = safetensors_numpy.load_file(str(tmp_path / "ckpt.safetensors"))
    side = json.loads((tmp_path / "ckpt.json").read_text())
    resumed = _params(seed=99)  # different weights, overwritten below
    for i, p in enumerate(resumed):
        p.data[...] = loaded[f"model.{i}"]
    opt2 = MAKERS[kind](resumed)
    sched2 = WarmupCosineSchedule(opt2, warmup_steps=1, total_steps=3)  # overwritten by load
    opt2.load_state_dict(join_state(side["optimizer"], loaded, prefix="optimizer."))
    sched2.load_state_dict(side["schedule"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    _train(resumed, opt2, sched2, 3, start=4)
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a.data, b.data)


def test_state_dict_layout():
    ps = _params()
    opt = AdamW(ps, lr=0.01)
    ps[0].grad = np.ones(SHAPES[0], np.float32)
    opt.step()
    opt.step()
    sd = opt.state_dict()
    assert sd["type"] == "AdamW" and sd["format"] == 1 and sd["step"] == 2
    assert sd["param_steps"] == [2, 0, 0]
    assert sd["param_groups"] == [{"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8,
                                   "weight_decay": 0.01, "params": [0, 1, 2]}]
    assert sorted(sd["state"]) == ["0.exp_avg", "0.exp_avg_sq"]
    assert sd["state"]["0.exp_avg"].shape == SHAPES[0]
    # a snapshot: later steps do not change it
    before = sd["state"]["0.exp_avg"].copy()
    opt.step()
    np.testing.assert_array_equal(sd["state"]["0.exp_avg"], before)
    meta, arrays = split_state(sd)
    assert set(arrays) == {"0.exp_avg", "0.exp_avg_sq"}
    assert meta["array_keys"] == ["0.exp_avg", "0.exp_avg_sq"] and "state" not in meta
    json.dumps(meta)


def test_split_and_join_round_trip_and_checks():
    ps = _params()
    opt = SGD(ps, lr=0.1, momentum=0.5)
    for p in ps:
        p.grad = np.ones_like(p.data)
    opt.step()
    sd = opt.state_dict()
    meta, arrays = split_state(sd, prefix="opt/")
    assert set(arrays) == {f"opt/{i}.momentum_buffer" for i in range(3)}
    back = join_state(meta, {**arrays, "model.w": np.zeros(2)}, prefix="opt/")
    assert back.keys() == sd.keys()
    for k in sd["state"]:
        np.testing.assert_array_equal(back["state"][k], sd["state"][k])
    missing = dict(arrays)
    del missing["opt/1.momentum_buffer"]
    with pytest.raises(KeyError, match="opt/1.momentum_buffer"):
        join_state(meta, missing, prefix="opt/")
    with pytest.raises(TypeError, match=r"not plain JSON"):
        split_state({**sd, "extra": np.float32(1.0)})
    with pytest.raises(TypeError, match=r"state_dict\['state'\]\['x'\] must be a numpy.ndarray"):
        split_state({"state": {"x": [1.0]}})
    # a schedule has no arrays: split/join pass it through
    sched = WarmupCosineSchedule(opt, 1, 10)
    meta, arrays = split_state(sched.state_dict())
    assert arrays == {} and join_state(meta, {}) == sched.state_dict()


def _trained_adamw():
    ps = _params()
    opt = AdamW(ps, lr=0.01)
    for t in range(3):
        for p, g in zip(ps, _grads(t)):
            p.grad = g
        opt.step()
    return ps, opt


def _corrupt(sd, edit):
    sd = copy.deepcopy(sd)
    edit(sd)
    return sd


BAD_LOADS = [
    ("wrong type", lambda sd: sd.update(type="SGD"), ValueError, r"'SGD'; this optimizer is AdamW"),
    ("wrong format", lambda sd: sd.update(format=7), ValueError, r"format"),
    ("bad shape", lambda sd: sd["state"].update({"1.exp_avg": np.zeros((4,), np.float32)}),
     ValueError, r"\['1.exp_avg'\] has shape \(4,\); parameter 1 has shape \(5,\)"),
    ("int array", lambda sd: sd["state"].update({"0.exp_avg": np.zeros((4, 3), np.int64)}),
     TypeError, r"\['0.exp_avg'\] must be floating"),
    ("not an array", lambda sd: sd["state"].update({"0.exp_avg": [0.0]}),
     TypeError, r"\['0.exp_avg'\] must be a numpy.ndarray"),
    ("unknown name", lambda sd: sd["state"].update({"0.momentum": np.zeros((4, 3))}),
     ValueError, r"unknown key '0.momentum'"),
    ("index out of range", lambda sd: sd["state"].update({"3.exp_avg": np.zeros(2)}),
     ValueError, r"'3.exp_avg' names parameter 3; this optimizer has 3 parameters"),
    ("missing buffer", lambda sd: sd["state"].pop("2.exp_avg_sq"),
     ValueError, r"lacks \['2.exp_avg_sq'\] although param_steps\[2\] = 3"),
    ("negative step", lambda sd: sd["param_steps"].__setitem__(0, -1),
     ValueError, r"param_steps'\]\[0\] must be >= 0"),
    ("bad lr", lambda sd: sd["param_groups"][0].update(lr=-1.0),
     ValueError, r"\['param_groups'\]\[0\]: lr must be finite and >= 0.0"),
    ("bad betas", lambda sd: sd["param_groups"][0].update(betas=[0.9]),
     ValueError, r"betas must be a pair"),
    ("group layout", lambda sd: sd["param_groups"][0].update(params=[0, 1]),
     ValueError, r"\['params'\] must be \[0, 1, 2\]"),
    ("two groups", lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])),
     ValueError, r"list of 1 group"),
    ("step type", lambda sd: sd.update(step="3"), TypeError, r"state_dict\['step'\] must be an int"),
]


@pytest.mark.parametrize("label,edit,exc,match", BAD_LOADS, ids=[b[0] for b in BAD_LOADS])
def test_bad_load_names_the_key_and_changes_nothing(label, edit, exc, match):
    ps, opt = _trained_adamw()
    good = opt.state_dict()
    bad = _corrupt(good, edit)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert {k: v for k, v in after.items() if k != "state"} == \
        {k: v for k, v in good.items() if k != "state"}
    assert after["state"].keys() == good["state"].keys()
    for k in good["state"]:
        np.testing.assert_array_equal(after["state"][k], good["state"][k])


def test_sgd_load_checks_buffers_against_momentum():
    ps = _params()
    opt = SGD(ps, lr=0.1)
    sd = opt.state_dict()
    sd["state"] = {"0.momentum_buffer": np.zeros(SHAPES[0], np.float32)}
    with pytest.raises(ValueError, match=r"'0.momentum_buffer' but parameter 0's group has momentum 0"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"'SGD'|this optimizer is SGD"):
        opt.load_state_dict(AdamW(_params()).state_dict())


def test_load_casts_buffers_to_the_parameter_dtype_and_copies_them():
    ps, opt = _trained_adamw()
    sd = opt.state_dict()
    sd["state"] = {k: v.astype(np.float64) for k, v in sd["state"].items()}
    opt.load_state_dict(sd)
    own = opt.state_dict()["state"]
    assert all(v.dtype == np.float32 for v in own.values())
    sd["state"]["0.exp_avg"][...] = 123.0  # the optimizer holds its own copy
    assert not np.any(opt.state_dict()["state"]["0.exp_avg"] == 123.0)


def test_loaded_hyperparameters_replace_the_constructed_ones():
    ps, opt = _trained_adamw()
    sd = opt.state_dict()
    fresh = AdamW(_params(), lr=0.5, betas=(0.5, 0.6), weight_decay=0.0)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == 0.01
    assert fresh.param_groups[0]["betas"] == (0.9, 0.999)
    assert fresh.step_count == 3


def test_schedule_load_validates_and_keeps_state_on_error():
    opt = SGD(_params(), lr=1.0)
    sched = WarmupCosineSchedule(opt, warmup_steps=3, total_steps=10)
    for _ in range(4):
        sched.step()
    good = sched.state_dict()
    lr_before = opt.param_groups[0]["lr"]
    for edit, match in [
        (lambda sd: sd.update(type="Other"), r"'Other'"),
        (lambda sd: sd.update(warmup_steps=20), r"warmup_steps must be <= total_steps \(10\)"),
        (lambda sd: sd.update(total_steps=0), r"total_steps must be >= 1"),
        (lambda sd: sd.update(min_lr_ratio=1.5), r"min_lr_ratio must be finite and >= 0.0 and <= 1.0"),
        (lambda sd: sd.update(base_lrs=[1.0, 2.0]), r"base_lrs'\] must be a list of 1"),
        (lambda sd: sd.update(last_step=-2), r"last_step'\] must be >= 0"),
        (lambda sd: sd.pop("last_step"), r"lacks \['last_step'\]"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            sched.load_state_dict(_corrupt(good, edit))
        assert sched.state_dict() == good and opt.param_groups[0]["lr"] == lr_before

"""SGD and AdamW: several steps against a NumPy simulation built on fastlora.reference.optim
(always) and against torch.optim (when torch is installed); parameter groups, skipped
parameters, the learning-rate handles, and argument checking."""
import math

import numpy as np
import pytest

from conftest import assert_close
from fastlora.nn import Parameter
from fastlora.optim import SGD, AdamW, WarmupCosineSchedule
from fastlora.reference import optim as reference

DTYPES = [np.float32, np.float64]
SHAPES = [(5, 3), (7,), (), (2, 3, 4), (1,)]
STEPS = 6


def _problem(rng, dtype, skip=True):
    """Initial weights and per-step gradients; with skip, some parameters miss some steps."""
    init = [np.array(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
    grads = []
    for t in range(STEPS):
        row = [np.array(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
        if skip:
            row[1] = None if t in (0, 3) else row[1]   # starts late, then pauses
            row[4] = None if t >= 2 else row[4]        # stops early
        grads.append(row)
    return init, grads


def _run_fastlora(make_opt, init, grads, schedule=None):
    params = [Parameter(a.copy()) for a in init]
    opt = make_opt(params)
    sched = schedule(opt) if schedule else None
    lrs = []
    for row in grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.copy()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched:
            sched.step()
    return [p.data for p in params], lrs


def _reference_adamw(init, grads, lr, betas, eps, weight_decay):
    params = [a.copy() for a in init]
    state = [None] * len(params)
    for row in grads:
        for i, g in enumerate(row):
            if g is None:
                continue
            if state[i] is None:
                state[i] = [0, np.zeros_like(params[i]), np.zeros_like(params[i])]
            state[i][0] += 1
            reference.adamw_update(params[i], g, state[i][1], state[i][2], step=state[i][0],
                                   lr=lr, beta1=betas[0], beta2=betas[1], eps=eps,
                                   weight_decay=weight_decay)
    return params


def _reference_sgd(init, grads, lr, momentum, dampening, weight_decay, nesterov):
    params = [a.copy() for a in init]
    bufs = [None] * len(params)
    for row in grads:
        for i, g in enumerate(row):
            if g is None:
                continue
            first = bufs[i] is None
            if momentum and first:
                bufs[i] = np.zeros_like(params[i])
            reference.sgd_update(params[i], g, bufs[i] if momentum else None, lr=lr,
                                 momentum=momentum, dampening=dampening,
                                 weight_decay=weight_decay, nesterov=nesterov, first_step=first)
    return params


ADAMW_CONFIGS = [
    dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0),
    dict(lr=0.02, betas=(0.3, 0.5), eps=1e-8, weight_decay=0.2),
]
SGD_CONFIGS = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False),
    dict(lr=0.05, momentum=0.5, dampening=0.3, weight_decay=0.0, nesterov=False),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.05, nesterov=True),
]


# --- against the NumPy reference ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ADAMW_CONFIGS, ids=lambda c: f"lr{c['lr']}-b{c['betas'][0]}")
def test_adamw_matches_reference_simulation(rng, dtype, config):
    init, grads = _problem(rng, dtype)
    got, _ = _run_fastlora(lambda ps: AdamW(ps, **config), init, grads)
    want = _reference_adamw(init, grads, **config)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == dtype
        assert_close(g, w, scale=2, err_msg=f"parameter {i}")
    assert not np.array_equal(got[1], init[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: f"m{c['momentum']}-n{c['nesterov']}")
def test_sgd_matches_reference_simulation(rng, dtype, config):
    init, grads = _problem(rng, dtype)
    got, _ = _run_fastlora(lambda ps: SGD(ps, **config), init, grads)
    want = _reference_sgd(init, grads, **config)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, scale=2, err_msg=f"parameter {i}")


def test_parameters_without_grad_are_left_alone(rng):
    init, grads = _problem(rng, np.float64)
    for row in grads:
        row[2] = None
    for make in (lambda ps: AdamW(ps, weight_decay=0.5), lambda ps: SGD(ps, lr=0.1, weight_decay=0.5)):
        got, _ = _run_fastlora(make, init, grads)
        np.testing.assert_array_equal(got[2], init[2])  # not even weight decay touches it
        assert not np.array_equal(got[0], init[0])


def test_adamw_by_hand_first_step():
    """Step 1 of Adam moves each weight by lr * sign(g) (bias correction undoes the betas)."""
    p = Parameter(np.array([1.0, -2.0, 3.0]))
    p.grad = np.array([0.5, -4.0, 1e-3])
    AdamW([p], lr=0.1, eps=1e-12, weight_decay=0.0).step()
    np.testing.assert_allclose(p.data, [0.9, -1.9, 2.9], rtol=1e-9)
    q = Parameter(np.array([2.0]))
    q.grad = np.array([0.0])
    AdamW([q], lr=0.1, weight_decay=0.5).step()  # zero gradient: decay only, 2 * (1 - 0.05)
    np.testing.assert_allclose(q.data, [1.9], rtol=1e-12)


def test_sgd_by_hand():
    p = Parameter(np.array([1.0, 2.0]))
    opt = SGD([p], lr=0.5, momentum=0.9)
    p.grad = np.array([1.0, -1.0])
    opt.step()                                    # buffer = g
    np.testing.assert_allclose(p.data, [0.5, 2.5])
    opt.step()                                    # buffer = 0.9 g + g = 1.9 g
    np.testing.assert_allclose(p.data, [0.5 - 0.95, 2.5 + 0.95])


def test_tied_and_noncontiguous_parameters(rng):
    """A parameter whose data is a strided view is updated in place, through the view."""
    base = rng.standard_normal((4, 6))
    view = base[:, ::2]
    p = Parameter(view)
    assert p.data is view or np.shares_memory(p.data, base)
    g = rng.standard_normal(view.shape)
    p.grad = g.copy()
    expected = view.copy()
    AdamW([p], lr=0.1, weight_decay=0.0).step()
    reference.adamw_update(expected, g, np.zeros_like(g), np.zeros_like(g), step=1, lr=0.1,
                           beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    assert_close(base[:, ::2], expected)
    assert_close(p.data, expected)


def test_grad_in_another_dtype_or_layout_is_accepted(rng):
    p = Parameter(np.zeros((3, 4), np.float32))
    p.grad = np.asfortranarray(rng.standard_normal((3, 4)))  # float64, column-major
    q = Parameter(np.zeros((3, 4), np.float32))
    q.grad = np.ascontiguousarray(p.grad, dtype=np.float32)
    SGD([p], lr=0.1).step()
    SGD([q], lr=0.1).step()
    np.testing.assert_array_equal(p.data, q.data)


def test_state_follows_a_dtype_change(rng):
    p = Parameter(rng.standard_normal(5).astype(np.float32))
    opt = AdamW([p])
    p.grad = np.ones(5, np.float32)
    opt.step()
    p.data = p.data.astype(np.float64)  # what Module.to_dtype does
    p.grad = np.ones(5)
    opt.step()
    assert p.data.dtype == np.float64
    assert opt.state_dict()["state"]["0.exp_avg"].dtype == np.float64


# --- learning-rate handles, zero_grad, closure ------------------------------------------------

def test_lr_through_param_groups_and_attribute():
    p = Parameter(np.zeros(2))
    opt = SGD([p], lr=0.1)
    assert opt.lr == opt.param_groups[0]["lr"] == 0.1
    opt.param_groups[0]["lr"] = 0.5
    p.grad = np.ones(2)
    opt.step()
    np.testing.assert_allclose(p.data, [-0.5, -0.5])
    opt.lr = 0.25
    assert opt.param_groups[0]["lr"] == 0.25
    opt.step()
    np.testing.assert_allclose(p.data, [-0.75, -0.75])
    opt.param_groups[0]["lr"] = 0.0  # a schedule may reach zero
    opt.step()
    np.testing.assert_allclose(p.data, [-0.75, -0.75])
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"lr must be finite and >= 0.0, got -1.0"):
        opt.step()
    with pytest.raises(ValueError, match="lr"):
        opt.lr = float("nan")


def test_zero_grad_and_closure():
    ps = [Parameter(np.ones(3)), Parameter(np.ones(2))]
    opt = SGD(ps, lr=0.1)
    for p in ps:
        p.grad = np.ones_like(p.data)
    opt.zero_grad(set_to_none=False)
    assert all(np.array_equal(p.grad, np.zeros_like(p.data)) for p in ps)
    opt.zero_grad()
    assert all(p.grad is None for p in ps)
    calls = []

    def closure():
        calls.append(1)
        for p in ps:
            p.grad = np.full_like(p.data, 2.0)
        return 1.5

    assert opt.step(closure) == 1.5 and calls == [1]
    np.testing.assert_allclose(ps[0].data, 0.8)
    assert opt.step_count == 1


def test_param_groups_use_their_own_options(rng):
    a, b = Parameter(np.ones(3)), Parameter(np.ones(3))
    opt = AdamW([{"params": [a], "weight_decay": 0.0}, {"params": b, "lr": 0.01}], lr=0.1,
                weight_decay=0.5)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0.0
    assert opt.param_groups[1]["lr"] == 0.01 and opt.param_groups[1]["weight_decay"] == 0.5
    a.grad, b.grad = np.zeros(3), np.zeros(3)
    opt.step()
    np.testing.assert_allclose(a.data, 1.0)                # no decay, no gradient
    np.testing.assert_allclose(b.data, 1.0 - 0.01 * 0.5)   # decay at the group's own lr
    opt.lr = 0.2
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.2]


# --- argument checking --------------------------------------------------------------------------

def test_accepts_a_generator_once():
    params = [Parameter(np.zeros(2)), Parameter(np.zeros(3))]
    gen = (p for p in params)
    opt = SGD(gen, lr=0.1)
    assert opt.param_groups[0]["params"] == params
    with pytest.raises(ValueError, match="params is empty.*exhausted generator"):
        SGD(gen, lr=0.1)


@pytest.mark.parametrize("cls", [SGD, AdamW])
def test_bad_params_are_refused(cls):
    p = Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="params is empty"):
        cls([], lr=0.1)
    with pytest.raises(TypeError, match="single Tensor"):
        cls(p, lr=0.1)
    with pytest.raises(TypeError, match=r"params\[1\] must be a fastlora Parameter"):
        cls([p, np.zeros(2)], lr=0.1)
    with pytest.raises(ValueError, match=r"params\[1\] is the same parameter as parameter 0"):
        cls([p, p], lr=0.1)
    with pytest.raises(ValueError, match=r"param group 1: params\[0\] is the same parameter"):
        cls([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ValueError, match="unknown option.*'weight_deacy'"):
        cls([{"params": [p], "weight_deacy": 0.1}], lr=0.1)
    with pytest.raises(TypeError, match="mixes"):
        cls([p, {"params": [p]}], lr=0.1)
    with pytest.raises(TypeError, match="iterable"):
        cls(3, lr=0.1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0.0), r"lr must be finite and > 0.0, got 0.0"),
    (dict(lr=-1e-3), r"lr must be finite and > 0.0"),
    (dict(lr=float("inf")), r"lr must be finite"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\] must be finite and >= 0.0 and < 1.0, got 1.0"),
    (dict(betas=(-0.1, 0.9)), r"betas\[0\] must be"),
    (dict(betas=0.9), r"betas must be a pair"),
    (dict(eps=0.0), r"eps must be finite and > 0.0"),
    (dict(weight_decay=-0.01), r"weight_decay must be finite and >= 0.0"),
    (dict(lr="1e-3"), r"lr must be a real number"),
])
def test_adamw_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AdamW([Parameter(np.zeros(2))], **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0), r"lr must be finite and > 0.0"),
    (dict(lr=0.1, momentum=-0.5), r"momentum must be finite and >= 0.0"),
    (dict(lr=0.1, dampening=2.0), r"dampening must be finite and >= 0.0 and <= 1.0"),
    (dict(lr=0.1, weight_decay=-1), r"weight_decay must be"),
    (dict(lr=0.1, nesterov=True), r"nesterov=True needs momentum > 0"),
    (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), r"and dampening == 0"),
    (dict(lr=0.1, nesterov=1), r"nesterov must be a bool"),
])
def test_sgd_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SGD([Parameter(np.zeros(2))], **kwargs)


def test_a_bad_gradient_fails_the_whole_step():
    ps = [Parameter(np.zeros(2)), Parameter(np.zeros((2, 3)))]
    opt = AdamW(ps)
    ps[0].grad = np.ones(2)
    ps[1].grad = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(2, 3\) but its grad is an "
                                         r"array of shape \(3, 2\)"):
        opt.step()
    np.testing.assert_array_equal(ps[0].data, np.zeros(2))  # not half applied
    assert opt.state_dict()["param_steps"] == [0, 0] and opt.step_count == 0


def test_integer_parameter_is_refused():
    from fastlora.autograd import Tensor
    with pytest.raises(TypeError, match=r"params\[0\] has dtype int64"):
        SGD([Tensor(np.arange(3))], lr=0.1)


# --- against torch ------------------------------------------------------------------------------

def _run_torch(make_opt, init, grads, schedule=None):
    torch = pytest.importorskip("torch")
    params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    opt = make_opt(torch, params)
    sched = schedule(torch, opt) if schedule else None
    lrs = []
    for row in grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched:
            sched.step()
    return [p.detach().numpy() for p in params], lrs


# float32 results agree with torch's to rounding; torch's vectorised kernels round differently
TORCH_TOL = {np.float32: dict(rtol=2e-6, atol=2e-7), np.float64: dict(rtol=1e-12, atol=1e-14)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ADAMW_CONFIGS, ids=lambda c: f"lr{c['lr']}-b{c['betas'][0]}")
def test_adamw_matches_torch(rng, dtype, config):
    init, grads = _problem(rng, dtype)
    want, _ = _run_torch(lambda torch, ps: torch.optim.AdamW(ps, **config), init, grads)
    got, _ = _run_fastlora(lambda ps: AdamW(ps, **config), init, grads)
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, **TORCH_TOL[dtype], err_msg=f"parameter {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: f"m{c['momentum']}-n{c['nesterov']}")
def test_sgd_matches_torch(rng, dtype, config):
    init, grads = _problem(rng, dtype)
    want, _ = _run_torch(lambda torch, ps: torch.optim.SGD(ps, **config), init, grads)
    got, _ = _run_fastlora(lambda ps: SGD(ps, **config), init, grads)
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, **TORCH_TOL[dtype], err_msg=f"parameter {i}")


def test_param_groups_and_schedule_match_torch(rng):
    """Two groups, a warmup-cosine schedule stepped after each update: torch's LambdaLR with
    the same multiplier gives the same learning rates and the same weights."""
    init, grads = _problem(rng, np.float64, skip=False)

    def groups(ps):
        return [{"params": ps[:2], "weight_decay": 0.0}, {"params": ps[2:], "lr": 0.02}]

    def fl_schedule(opt):
        return WarmupCosineSchedule(opt, warmup_steps=2, total_steps=STEPS, min_lr_ratio=0.1)

    probe = WarmupCosineSchedule(SGD([Parameter(np.zeros(1))], lr=1.0), 2, STEPS, 0.1)
    got, got_lrs = _run_fastlora(lambda ps: AdamW(groups(ps), lr=0.05), init, grads, fl_schedule)
    want, want_lrs = _run_torch(
        lambda torch, ps: torch.optim.AdamW(groups(ps), lr=0.05), init, grads,
        lambda torch, opt: torch.optim.lr_scheduler.LambdaLR(opt, probe.factor))
    np.testing.assert_allclose(got_lrs, want_lrs, rtol=1e-15)
    assert got_lrs[0] == pytest.approx(0.05 / 3) and max(got_lrs) == pytest.approx(0.05)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)


def test_training_a_linear_model_matches_torch(rng):
    """End to end: fastlora's autograd + AdamW + clipping against torch on a small regression."""
    torch = pytest.importorskip("torch")
    from fastlora.autograd import Tensor, linear, mean, mul
    from fastlora.optim import clip_grad_norm
    x = rng.standard_normal((16, 5)).astype(np.float32)
    y = rng.standard_normal((16, 3)).astype(np.float32)
    w0 = rng.standard_normal((3, 5)).astype(np.float32)
    b0 = np.zeros(3, np.float32)

    w, b = Parameter(w0.copy()), Parameter(b0.copy())
    opt = AdamW([w, b], lr=0.05)
    tw, tb = torch.nn.Parameter(torch.from_numpy(w0.copy())), torch.nn.Parameter(torch.from_numpy(b0.copy()))
    topt = torch.optim.AdamW([tw, tb], lr=0.05)
    for _ in range(5):
        diff = linear(Tensor(x), w, b) - Tensor(y)
        loss = mean(mul(diff, diff))
        opt.zero_grad()
        loss.backward()
        norm = clip_grad_norm([w, b], 1.0)
        opt.step()

        tloss = ((torch.from_numpy(x) @ tw.T + tb - torch.from_numpy(y)) ** 2).mean()
        topt.zero_grad()
        tloss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_([tw, tb], 1.0)
        topt.step()
        assert math.isclose(norm, float(tnorm), rel_tol=1e-5)
        assert math.isclose(loss.item(), tloss.item(), rel_tol=1e-5)
    np.testing.assert_allclose(w.data, tw.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.data, tb.detach().numpy(), rtol=1e-4, atol=1e-5)

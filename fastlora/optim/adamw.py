"""AdamW: Adam with decoupled weight decay, one fused Cython kernel per parameter.

Matches torch.optim.AdamW (amsgrad=False, maximize=False): each parameter keeps its own step
count (a parameter skipped for lack of a gradient does not advance), so bias corrections
agree with torch's even when some parameters get gradients only some of the time.
"""
from __future__ import annotations

from typing import Tuple

from fastlora._typing import Params
from fastlora.checks import check_int, check_real
from fastlora.defaults import WEIGHT_DECAY
from fastlora.optim import kernels
from fastlora.optim.optimizer import Optimizer


class AdamW(Optimizer):
    """AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01).

    params: Parameters (a generator is fine) or a list of group dicts {"params": [...], "lr": ...}.
    """

    HYPER = ("lr", "betas", "eps", "weight_decay")
    STATE_ARRAYS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = WEIGHT_DECAY) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})

    def check_hyper(self, values, where, step_time=False):
        """Checked, normalised hyper-parameters. The constructor wants lr > 0; a schedule may
        later lower a group's lr to 0 (step_time=True), never below."""
        betas = values["betas"]
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ValueError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
        return {
            "lr": check_real(where + "lr", values["lr"], low=0.0, low_open=not step_time),
            "betas": (check_real(where + "betas[0]", betas[0], low=0.0, high=1.0, high_open=True),
                      check_real(where + "betas[1]", betas[1], low=0.0, high=1.0, high_open=True)),
            "eps": check_real(where + "eps", values["eps"], low=0.0, low_open=True),
            "weight_decay": check_real(where + "weight_decay", values["weight_decay"], low=0.0),
        }

    def _update(self, i, p, data, grad, hyper):
        state = self._state[i]
        exp_avg = self._buffer(i, "exp_avg", data)
        exp_avg_sq = self._buffer(i, "exp_avg_sq", data)
        step = state.get("step", 0) + 1
        beta1, beta2 = hyper["betas"]
        kernels._adamw_kernel(data, grad, exp_avg, exp_avg_sq, step, hyper["lr"], beta1, beta2,
                              hyper["eps"], hyper["weight_decay"])
        state["step"] = step

    def _extra_state(self):
        # per-parameter update counts: JSON ints, index-aligned with the parameters
        return {"param_steps": [state.get("step", 0) for state in self._state]}

    def _load_extra(self, sd, new_state, new_hyper):
        steps = sd.get("param_steps")
        if not isinstance(steps, list) or len(steps) != len(new_state):
            raise ValueError(f"state_dict['param_steps'] must be a list of {len(new_state)} "
                             f"ints (one per parameter), got {steps!r:.80}")
        for i, (raw, state) in enumerate(zip(steps, new_state)):
            step = check_int(f"state_dict['param_steps'][{i}]", raw, low=0)
            present = [name for name in self.STATE_ARRAYS if name in state]
            if step > 0 and len(present) != len(self.STATE_ARRAYS):
                missing = [f"{i}.{n}" for n in self.STATE_ARRAYS if n not in state]
                raise ValueError(f"state_dict['state'] lacks {missing} although "
                                 f"param_steps[{i}] = {step}")
            if step == 0 and present:
                raise ValueError(f"state_dict['state'] has '{i}.{present[0]}' although "
                                 f"param_steps[{i}] = 0 (parameter {i} was never updated)")
            if step > 0:
                state["step"] = step

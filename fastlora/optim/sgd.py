"""SGD with optional momentum, dampening, Nesterov momentum and (coupled) weight decay.

Matches torch.optim.SGD (maximize=False): weight decay is added to the gradient; the momentum
buffer starts as the first step's direction, undamped. The update is one Cython kernel per
parameter.
"""
from __future__ import annotations

from fastlora._typing import Params
from fastlora.checks import check_real
from fastlora.optim import kernels
from fastlora.optim.optimizer import Optimizer


class SGD(Optimizer):
    """SGD(params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False).

    params: Parameters (a generator is fine) or a list of group dicts {"params": [...], "lr": ...}.
    """

    HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    STATE_ARRAYS = ("momentum_buffer",)

    def __init__(self, params: Params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov})

    def check_hyper(self, values, where, step_time=False):
        """Checked, normalised hyper-parameters. The constructor wants lr > 0; a schedule may
        later lower a group's lr to 0 (step_time=True), never below."""
        nesterov = values["nesterov"]
        if not isinstance(nesterov, bool):
            raise TypeError(f"{where}nesterov must be a bool, got {nesterov!r}")
        hyper = {
            "lr": check_real(where + "lr", values["lr"], low=0.0, low_open=not step_time),
            "momentum": check_real(where + "momentum", values["momentum"], low=0.0),
            "dampening": check_real(where + "dampening", values["dampening"], low=0.0, high=1.0),
            "weight_decay": check_real(where + "weight_decay", values["weight_decay"], low=0.0),
            "nesterov": nesterov,
        }
        if nesterov and (hyper["momentum"] == 0.0 or hyper["dampening"] != 0.0):
            raise ValueError(f"{where}nesterov=True needs momentum > 0 and dampening == 0, got "
                             f"momentum={hyper['momentum']}, dampening={hyper['dampening']}")
        return hyper

    def _update(self, i, p, data, grad, hyper):
        buf, first = None, False
        if hyper["momentum"] != 0.0:
            first = "momentum_buffer" not in self._state[i]
            buf = self._buffer(i, "momentum_buffer", data)
        kernels._sgd_kernel(data, grad, buf, hyper["lr"], hyper["momentum"], hyper["dampening"],
                            hyper["weight_decay"], hyper["nesterov"], first)

    def _load_extra(self, sd, new_state, new_hyper):
        for hyper, (start, end) in zip(new_hyper, self._group_ranges):
            if hyper["momentum"] != 0.0:
                continue
            for i in range(start, end):
                if "momentum_buffer" in new_state[i]:
                    raise ValueError(f"state_dict['state'] has '{i}.momentum_buffer' but "
                                     f"parameter {i}'s group has momentum 0")

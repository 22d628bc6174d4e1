"""LoRA settings as plain data, and the argument checks every LoRA entry point shares.

`LoraConfig` holds what one adapter needs (rank, alpha, dropout, rsLoRA, targets) and maps
one-to-one onto the PEFT `adapter_config.json` fields (r, lora_alpha, lora_dropout, ...).
The checks raise ValueError/TypeError naming the argument and the bound it broke, and are
run before anything is modified, so a refused call leaves the model as it was.
"""
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import numpy as np

# Adapter names become parameter-name parts ("q_proj.lora_A.<name>") and folder names.
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


def check_rank(rank, in_features=None, out_features=None, where=""):
    """rank must be an int in [1, min(in_features, out_features)]."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an int, got {rank!r}")
    if rank <= 0:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if in_features is not None:
        bound = min(in_features, out_features)
        if rank > bound:
            at = f" for {where}" if where else ""
            raise ValueError(f"rank must be <= min(in_features, out_features) = {bound}{at} "
                             f"(in={in_features}, out={out_features}), got {rank}")
    return int(rank)


def check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise TypeError(f"alpha must be a number, got {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be > 0 and finite, got {alpha}")
    return float(alpha)


def check_dropout(p):
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
        raise TypeError(f"dropout must be a number, got {p!r}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    return float(p)


def check_adapter_name(name):
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"adapter name must be letters, digits, '_' or '-' (not starting with "
                         f"'_' or '-'), got {name!r}")
    return name


def scaling_for(rank, alpha, use_rslora):
    """alpha / rank, or alpha / sqrt(rank) with rsLoRA (as PEFT)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class LoraConfig:
    """One adapter's settings; field names follow PEFT's LoraConfig."""
    r: int = 4
    lora_alpha: Optional[float] = None  # None: alpha = r, so the scaling is 1 (PEFT's default ratio)
    target_modules: Union[str, List[str], None] = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    bias: str = "none"
    base_model_name_or_path: Optional[str] = None
    task_type: str = "CAUSAL_LM"
    # {regex: rank} / {regex: alpha} for the layers that differ from r / lora_alpha (PEFT's rule:
    # a key matches a module path that ends with it after a dot, the first matching key wins)
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False  # as read from a file: True for GPT-2's Conv1D layers

    def validate(self):
        """Check every field (dimension bounds are checked per layer at injection)."""
        self.r = check_rank(self.r)
        self.lora_alpha = float(self.r) if self.lora_alpha is None else check_alpha(self.lora_alpha)
        self.lora_dropout = check_dropout(self.lora_dropout)
        if not isinstance(self.use_rslora, (bool, np.bool_)):
            raise TypeError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        self.use_rslora = bool(self.use_rslora)
        if self.bias != "none":
            raise ValueError(f"bias must be 'none' (training biases is not supported), got {self.bias!r}")
        if self.target_modules is not None:
            normalize_targets(self.target_modules)  # checked here; kept as given (a str stays a str)
            if isinstance(self.target_modules, (list, tuple, set, frozenset)):
                self.target_modules = normalize_targets(self.target_modules)
        self.rank_pattern = _check_pattern("rank_pattern", self.rank_pattern, check_rank)
        self.alpha_pattern = _check_pattern("alpha_pattern", self.alpha_pattern, check_alpha)
        return self

    @property
    def scaling(self):
        return scaling_for(self.r, self.lora_alpha, self.use_rslora)

    def rank_for(self, path):
        key = pattern_key(self.rank_pattern, path)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, path):
        key = pattern_key(self.alpha_pattern, path)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def for_layer(self, path):
        """The settings of the layer at `path`: its own rank and alpha, the rest shared."""
        return LoraConfig(r=self.rank_for(path), lora_alpha=self.alpha_for(path), lora_dropout=self.lora_dropout,
                          use_rslora=self.use_rslora).validate()


def pattern_key(pattern, path):
    """The first key of `pattern` that matches `path` as PEFT matches them, or None."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def _check_pattern(name, pattern, check_value):
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise TypeError(f"{name} must be a dict {{module regex: value}}, got {type(pattern).__name__}")
    out = {}
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{name} keys must be non-empty str, got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise ValueError(f"{name} key {key!r} is not a valid regular expression ({exc})") from None
        try:
            out[key] = check_value(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}[{key!r}]: {exc}") from None
    return out


def normalize_targets(target_modules):
    """A str (a name, a path, a regex or "all-linear") or a non-empty list of str -> list."""
    if isinstance(target_modules, str):
        targets = [target_modules]
    elif isinstance(target_modules, (list, tuple, set, frozenset)):
        targets = list(target_modules)
    else:
        raise TypeError(f"target_modules must be a str or a list of str, got {type(target_modules).__name__}")
    if not targets:
        raise ValueError("target_modules must not be empty: name at least one module "
                         "(e.g. ['q_proj', 'v_proj'] or 'all-linear')")
    for t in targets:
        if not isinstance(t, str) or not t:
            raise TypeError(f"each target module must be a non-empty str, got {t!r}")
    if isinstance(target_modules, (set, frozenset)):
        targets.sort()  # a set has no order; keep saved configs reproducible
    return targets

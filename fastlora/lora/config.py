"""LoRA settings as plain data, and the argument checks every LoRA entry point shares.

`LoraConfig` holds what one adapter needs (rank, alpha, dropout, rsLoRA, targets, DoRA, the
initialisation, which layers, which biases and whole modules train) and maps one-to-one onto
the PEFT `adapter_config.json` fields (r, lora_alpha, lora_dropout, use_dora, ...).
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
    use_dora: bool = False  # DoRA: a trained magnitude per output row times the normalised W + delta
    # True (Kaiming A, zero B), False (B random too), "gaussian", "pissa", "pissa_niter_<K>", "olora"
    init_lora_weights: Union[bool, str] = True
    # only these layer indices ("blocks.<i>." / GPT-2's "h.<i>."), found after `layers_pattern` when given
    layers_to_transform: Union[int, List[int], None] = None
    layers_pattern: Union[str, List[str], None] = None
    modules_to_save: Optional[List[str]] = None  # modules trained in full beside the adapter, saved with it

    def validate(self):
        """Check every field (dimension bounds are checked per layer at injection)."""
        self.r = check_rank(self.r)
        self.lora_alpha = float(self.r) if self.lora_alpha is None else check_alpha(self.lora_alpha)
        self.lora_dropout = check_dropout(self.lora_dropout)
        if not isinstance(self.use_rslora, (bool, np.bool_)):
            raise TypeError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        self.use_rslora = bool(self.use_rslora)
        if self.bias not in BIAS_OPTIONS:
            raise ValueError(f"bias must be one of {list(BIAS_OPTIONS)}, got {self.bias!r}")
        if not isinstance(self.use_dora, (bool, np.bool_)):
            raise TypeError(f"use_dora must be a bool, got {self.use_dora!r}")
        self.use_dora = bool(self.use_dora)
        self.init_lora_weights = check_init(self.init_lora_weights)
        self.layers_to_transform, self.layers_pattern = _check_layers(
            self.layers_to_transform, self.layers_pattern, self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = _check_names("modules_to_save", self.modules_to_save)
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
                          use_rslora=self.use_rslora, use_dora=self.use_dora,
                          init_lora_weights=self.init_lora_weights).validate()

    @property
    def rewrites_base(self):
        """Whether the init moved part of W into the adapter (PiSSA, OLoRA): W became W - s B0 A0."""
        return isinstance(self.init_lora_weights, str) and self.init_lora_weights.startswith(("pissa", "olora"))


BIAS_OPTIONS = ("none", "lora_only", "all")
# the values of init_lora_weights fastlora implements; PEFT's others rewrite W in ways it does not
_INITS = (True, False, "gaussian", "pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def check_init(init):
    """init_lora_weights: True, False, "gaussian", "pissa", "pissa_niter_<K>" or "olora"."""
    if isinstance(init, (bool, np.bool_)):
        return bool(init)
    if isinstance(init, str) and (init in _INITS or _PISSA_NITER.fullmatch(init)):
        return init
    raise ValueError(f"init_lora_weights must be one of True, False, 'gaussian', 'pissa', 'pissa_niter_<K>' "
                     f"(K >= 0 subspace iterations) or 'olora', got {init!r}")


def pissa_niter(init):
    """K of "pissa_niter_K", or None for a full SVD ("pissa")."""
    m = _PISSA_NITER.fullmatch(init)
    return int(m.group(1)) if m else None


def _check_names(field_name, names):
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{field_name} must be a list of module names, got {names!r}")
    return list(names)


def _check_layers(layers, pattern, target_modules):
    """layers_to_transform / layers_pattern as PEFT checks them: only with a list of targets."""
    if layers is None or (isinstance(layers, list) and not layers):
        if pattern:
            raise ValueError("layers_pattern needs layers_to_transform (the layer indices to adapt)")
        return None, None
    if isinstance(target_modules, str):
        raise ValueError(f"layers_to_transform cannot be used when target_modules is a str "
                         f"({target_modules!r}, a regex or 'all-linear'); name the modules in a list")
    indices = [layers] if not isinstance(layers, (list, tuple)) else list(layers)
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise TypeError(f"layers_to_transform must be a layer index >= 0 or a list of them, got {layers!r}")
    indices = [int(i) for i in indices]
    if pattern is not None:
        pattern = _check_names("layers_pattern", pattern)
        pattern = pattern[0] if len(pattern) == 1 else pattern
    return (indices[0] if not isinstance(layers, (list, tuple)) else indices), pattern


def layer_index(path, layers_pattern=None):
    """The layer index PEFT reads from a module path, or None: the first `<name>.<number>.` (after
    one of `layers_pattern` when given). "transformer.h.3.attn.c_attn" -> 3, as in PEFT; a path
    that starts with it, "blocks.3.attn.q_proj", -> 3 too (PEFT's rule wants a prefix before it).
    """
    if layers_pattern:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        rxs = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns]
    else:
        rxs = [r"[^.]*\.(?P<idx>\d+)\.", r".*?\.[^.]*\.(?P<idx>\d+)\."]
    for rx in rxs:
        m = re.match(rx, path)
        if m:
            return int(m.group("idx"))
    return None


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


def make_config(name, **fields):
    """A validated LoraConfig; errors name the adapter."""
    try:
        return LoraConfig(**fields).validate()
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise TypeError(f"adapter {name!r}: {str(exc).replace('LoraConfig.__init__()', 'LoRAModel')}") from None
        raise TypeError(f"adapter {name!r}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"adapter {name!r}: {exc}") from None

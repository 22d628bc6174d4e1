"""Which Linear layers of a model an adapter targets: by short name, full path, regex or "all-linear".

A target entry matches a module path when it equals the path, equals its last part(s)
(`"q_proj"` or `"attn.q_proj"` match `blocks.0.attn.q_proj`, as PEFT's suffix rule), or
is a regular expression that fully matches the path (`r"blocks\\.[01]\\.attn\\.(q|v)_proj"`).
`"all-linear"` means every Linear except an output head named `lm_head` (the GPT's head
is tied to the embedding, so it has none). `"qkv_proj"`, the seed's name for a fused
attention input projection, means q_proj, k_proj and v_proj in a model that has no layer of
that name. `layers_to_transform` keeps only the layers of those indices (PEFT's rule, see
fastlora.lora.config.layer_index). Every entry must match something, otherwise the error
lists the Linear layers that exist.
"""
import re

from fastlora.lora.config import check_rank, layer_index, normalize_targets, pattern_key
from fastlora.lora.layer import LoRALinear
from fastlora.lora.trainable import resolve_modules_to_save
from fastlora.nn.layers import Linear

ALL_LINEAR = "all-linear"
# names that stand for several layers when no layer has the name itself
ALIASES = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}


def replace_module(root, path, new):
    """Put `new` at `path` in place of the module there, keeping its position among its siblings.

    (Module.set_submodule re-registers the child last, which would reorder named_parameters()
    and state_dict(); a model with LoRA injected lists its base parameters in the same order.)
    """
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path)
    if name not in parent._modules:
        raise KeyError(f"no submodule {path!r}")
    parent._modules[name] = new  # assigning an existing key keeps its place in the OrderedDict
    object.__setattr__(parent, name, new)


def adaptable_modules(model):
    """[(path, module)] for every Linear or LoRALinear in the model, in tree order."""
    return [(path, m) for path, m in model.named_modules()
            if path and isinstance(m, (Linear, LoRALinear))]


def _entry_matches(entry, path, pattern):
    if path == entry or path.endswith("." + entry):
        return True
    return pattern is not None and pattern.fullmatch(path) is not None


def resolve_targets(model, target_modules, layers_to_transform=None, layers_pattern=None, exclude=()):
    """The module paths `target_modules` selects, in tree order; ValueError when an entry matches nothing.

    layers_to_transform (an index or a list) keeps the layers of those indices only; `exclude`
    names modules (and everything inside them) that are never adapted (modules_to_save).
    """
    entries = normalize_targets(target_modules)
    layers = None if layers_to_transform is None else (
        {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform))
    candidates = adaptable_modules(model)
    paths = [p for p, _ in candidates if not any(re.match(rf"(^|.*\.){m}($|\..*)", p) for m in exclude)]
    if not paths:
        raise ValueError(f"{type(model).__name__} has no Linear layers to adapt")
    if ALL_LINEAR in entries:
        if len(entries) > 1:
            raise ValueError(f"'{ALL_LINEAR}' must be the only target, got {entries}")
        return [p for p in paths if p.rsplit(".", 1)[-1] != "lm_head"]
    chosen = set()
    for entry in entries:
        try:
            pattern = re.compile(entry)
        except re.error:
            pattern = None  # not a regex: it can still match as a name or a path
        hits = [p for p in paths if _entry_matches(entry, p, pattern)]
        if not hits and entry in ALIASES:
            hits = [p for p in paths if any(_entry_matches(part, p, None) for part in ALIASES[entry])]
        if not hits:
            raise ValueError(_no_match_message(model, entry, paths, pattern is None))
        if layers is not None:
            kept = [p for p in hits if layer_index(p, layers_pattern) in layers]
            if not kept:
                found = sorted({layer_index(p, layers_pattern) for p in hits} - {None})
                raise ValueError(f"target module {entry!r} matches no Linear layer in layers_to_transform="
                                 f"{sorted(layers)} (layers_pattern={layers_pattern!r}); the layers it matches "
                                 f"have indices {found}")
            hits = kept
        chosen.update(hits)
    return [p for p in paths if p in chosen]


def _no_match_message(model, entry, paths, bad_regex):
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    msg = f"target module {entry!r} matches no Linear layer"
    other = [(p, type(m).__name__) for p, m in model.named_modules()
             if p and (p == entry or p.endswith("." + entry))]
    if other:
        msg += f" ({other[0][0]} is a {other[0][1]}, and only Linear layers can be adapted)"
    if bad_regex:
        msg += " (it is not a valid regular expression either)"
    shown = paths if len(paths) <= 12 else paths[:12] + [f"... {len(paths) - 12} more"]
    return f"{msg}. Linear layers by name: {short}; by path: {shown}; or use '{ALL_LINEAR}'"


def check_targets(model, config, name="default"):
    """Resolve config's targets and modules_to_save in `model`, check the rank against every layer's
    size and every rank/alpha pattern key against the layers -> (paths, module paths to save)."""
    where = f"adapter {name!r}"
    saved = []
    if config.modules_to_save:
        saved = resolve_modules_to_save(model, config.modules_to_save, f"{where}: modules_to_save")
    try:
        paths = resolve_targets(model, config.target_modules, config.layers_to_transform, config.layers_pattern,
                                exclude=config.modules_to_save or ())
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    for path in paths:
        m = model.get_submodule(path)
        check_rank(config.rank_for(path), m.in_features, m.out_features, where=path)
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field):
            if not any(pattern_key({key: None}, p) for p in paths):
                raise ValueError(f"{where}: {field} key {key!r} matches none of the adapted layers "
                                 f"({paths[:4]}{' ...' if len(paths) > 4 else ''})")
    return paths, saved

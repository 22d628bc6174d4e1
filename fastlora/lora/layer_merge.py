"""The merging half of LoRALinear: the one delta, merge into W, unmerge out of it.

    plain LoRA   W' = W + sum of s B A over the merged adapters
    DoRA         W' = (W + s B A) * m / n, row by row, n = ||W + s B A|| (kept: unmerge multiplies by n / m)

merge, unmerge and merged_weight act on the active adapters (all of them when several are
active: forward and W must show the same thing). prepare_merge does every check and all the
arithmetic, apply_merge only writes, so LoRAMerger can check every layer before it changes any.
A subclass with a quantized W overrides base_array() (and how a merge is stored).
"""
import numpy as np


class LayerMerging:
    """Mixed into LoRALinear; uses its adapter_configs, lora_A/B, lora_magnitude_vector, weight,
    active_adapters, merged_adapters, _merge_norms, _require and base_array."""

    def delta_weight(self, name=None):
        """s * B @ A (O, I) for the active adapter (or `name`), in the weight's dtype."""
        name = self._require(name)
        B, A = self.lora_B[name].data, self.lora_A[name].data
        return (np.matmul(B, A) * self.adapter_configs[name].scaling).astype(self.weight.dtype, copy=False)

    def _names(self, names):
        if names is None:
            if not self.active_adapters:
                raise ValueError("no adapter is active; pass an adapter name")
            return list(self.active_adapters)
        return [self._require(n) for n in ([names] if isinstance(names, str) else names)]

    def _merged(self, names, base):
        """(W as merging `names` into `base` gives it, {DoRA adapter: the row norms used})."""
        if len(names) == 1 and self.adapter_configs[names[0]].use_dora:  # (W + s B A) * m / n, row by row
            name = names[0]
            w = base + self.delta_weight(name)
            norm = np.linalg.norm(w, axis=1).astype(w.dtype)
            w *= (self.lora_magnitude_vector[name].data / norm)[:, None]
            return w, {name: norm}
        w = base.copy()
        for name in names:
            w += self.delta_weight(name)
        return w, {}

    def merged_weight(self, names=None):
        """W with the active adapters (or `names`) merged, as a new array (a copy of W when they are)."""
        names = self._names(names)
        if self.merged_adapters == names:
            return self.base_array().copy()
        return self._merged(names, self.base_array())[0]

    def prepare_merge(self, names=None, safe_merge=False):
        """Checks and computes a merge without applying it -> (names, new W, DoRA norms).

        LoRAMerger prepares every layer before applying any, so a refused merge changes nothing.
        """
        names = self._names(names)
        if self.merged_adapters:
            raise ValueError(f"adapter {self.merged_adapter!r} is already merged into this layer; "
                             "unmerge it before merging again")
        if names != self.active_adapters:  # forward would then show one adapter while W holds another
            raise ValueError(f"adapter {names[0] if len(names) == 1 else names!r} is not the active adapter "
                             f"({self.active_adapter if len(self.active_adapters) < 2 else self.active_adapters!r}); "
                             "set_adapter() it before merging")
        new, norms = self._merged(names, self.base_array())
        if safe_merge and not np.all(np.isfinite(new)):
            raise ValueError(f"merging adapter {names[0] if len(names) == 1 else names!r} gives non-finite "
                             "weights; refusing (safe_merge)")
        return names, new, norms

    def apply_merge(self, prepared):
        names, new, norms = prepared
        np.copyto(self.weight.data, new)
        self.merged_adapters = list(names)
        self._merge_norms = norms

    def merge(self, names=None, safe_merge=False):
        """W += the active adapters' deltas (DoRA: W = (W + delta) * m / n); forward then uses W alone."""
        self.apply_merge(self.prepare_merge(names, safe_merge))

    def unmerge(self):
        """Take the merged adapters out of W again, restoring the base weight."""
        if not self.merged_adapters:
            raise ValueError("no adapter is merged into this layer; nothing to unmerge")
        w = self.weight.data
        for name in reversed(self.merged_adapters):
            if name in self._merge_norms:  # DoRA: W = W' * n / m - delta
                w *= (self._merge_norms[name] / self.lora_magnitude_vector[name].data)[:, None]
            w -= self.delta_weight(name)
        self.merged_adapters, self._merge_norms = [], {}

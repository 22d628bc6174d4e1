"""Hugging Face GPT-2 <-> fastlora's GPT: the config, the parameter names and the weight layout.

GPT-2's checkpoint names (optionally under "transformer.") and where they go:

    wte.weight, wpe.weight                 embed.weight, pos_embed.weight
    h.{i}.ln_1 / ln_2                      blocks.{i}.ln1 / ln2
    h.{i}.attn.c_attn (D, 3D), (3D,)       blocks.{i}.attn.q_proj / k_proj / v_proj: split, transposed
    h.{i}.attn.c_proj (D, D)               blocks.{i}.attn.out_proj, transposed
    h.{i}.mlp.c_fc (D, I), c_proj (I, D)   blocks.{i}.mlp.fc1 / fc2, transposed
    ln_f                                   ln_f
    lm_head.weight (V, D)                  lm_head.weight when untied; tied: the embedding, not stored

GPT-2's Conv1D keeps weights as (in, out), the transpose of a Linear's (out, in).
"""
import re

import numpy as np

from fastlora.nn.hf_files import load_state, save_folder

MODEL_TYPE = "gpt2"
# activation_function -> GPTConfig.activation; gelu_fast is the same tanh formula written otherwise
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "gelu_python": "gelu"}
# fields whose non-default value changes the model in a way the GPT cannot represent
_UNSUPPORTED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "add_cross_attention": False}
# causal-mask buffers that old GPT-2 checkpoints store beside the weights; not parameters
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def config_to_kwargs(config, where):
    """A GPT-2 config.json dict -> GPT(**kwargs); ValueError naming the field it cannot represent."""
    for field, default in _UNSUPPORTED.items():
        if config.get(field, default) != default:
            raise ValueError(f"{where}: {field}={config[field]!r} is not supported by fastlora's GPT "
                             f"(it needs {field}={default!r})")
    activation = config.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation_function {activation!r} is not supported; "
                         f"supported: {sorted(ACTIVATIONS)}")
    try:
        kwargs = dict(vocab_size=config["vocab_size"], embed_dim=config["n_embd"], num_heads=config["n_head"],
                      num_layers=config["n_layer"], max_seq_len=config["n_positions"])
    except KeyError as exc:
        raise ValueError(f"{where}: missing required field {exc.args[0]!r}") from None
    kwargs.update(mlp_hidden=config.get("n_inner"), activation=ACTIVATIONS[activation],
                  layer_norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
                  tie_word_embeddings=bool(config.get("tie_word_embeddings", True)))
    return kwargs


def config_from_model(model):
    """The config.json of `model`: its own fields, over those it was loaded with (kept as they were)."""
    c = model.config
    config = dict(model.hf_config or {})
    if not model.hf_config:  # made here: GPT-2's remaining fields, with fastlora's dropout
        config.update(architectures=["GPT2LMHeadModel"], resid_pdrop=c.dropout, embd_pdrop=c.dropout,
                      attn_pdrop=0.0, initializer_range=0.02, use_cache=True)
    activation = config.get("activation_function")
    if ACTIVATIONS.get(activation) != c.activation:
        activation = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[c.activation]
    config.update(model_type=MODEL_TYPE, vocab_size=c.vocab_size, n_embd=c.embed_dim, n_head=c.num_heads,
                  n_layer=c.num_layers, n_positions=c.max_seq_len,
                  n_inner=None if c.hidden_dim == 4 * c.embed_dim else c.hidden_dim,
                  activation_function=activation, layer_norm_epsilon=c.layer_norm_eps,
                  tie_word_embeddings=c.tie_word_embeddings, dtype=str(model.dtype), **_UNSUPPORTED)
    config.pop("torch_dtype", None)  # transformers' older name for dtype
    config.pop("n_ctx", None)  # an old alias of n_positions
    return config


def _block_names(i):
    """[(GPT-2 name, fastlora names, split into q/k/v)] for block i."""
    h, b = f"h.{i}.", f"blocks.{i}."
    pairs = [("ln_1.weight", "ln1.weight"), ("ln_1.bias", "ln1.bias"),
             ("ln_2.weight", "ln2.weight"), ("ln_2.bias", "ln2.bias"),
             ("attn.c_proj.weight", "attn.out_proj.weight"), ("attn.c_proj.bias", "attn.out_proj.bias"),
             ("mlp.c_fc.weight", "mlp.fc1.weight"), ("mlp.c_fc.bias", "mlp.fc1.bias"),
             ("mlp.c_proj.weight", "mlp.fc2.weight"), ("mlp.c_proj.bias", "mlp.fc2.bias")]
    out = [(h + src, [b + dst]) for src, dst in pairs]
    for kind in ("weight", "bias"):
        out.append((h + "attn.c_attn." + kind, [b + f"attn.{p}_proj.{kind}" for p in "qkv"]))
    return out


def name_map(config):
    """[(GPT-2 name, [fastlora names])] for a GPTConfig: every tensor a GPT-2 file holds."""
    names = [("wte.weight", ["embed.weight"]), ("wpe.weight", ["pos_embed.weight"])]
    for i in range(config.num_layers):
        names.extend(_block_names(i))
    names += [("ln_f.weight", ["ln_f.weight"]), ("ln_f.bias", ["ln_f.bias"])]
    if not config.tie_word_embeddings:
        names.append(("lm_head.weight", ["lm_head.weight"]))
    return names


def _is_conv1d(hf_name):
    return hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


def _canonical(name):
    """A checkpoint name without GPT2LMHeadModel's "transformer." prefix (GPT2Model has none)."""
    return name[len("transformer."):] if name.startswith("transformer.") else name


def load_weights(model, files):
    """Fill `model` (a GPT built from the folder's config) from its GPT-2 weights (a WeightFiles);
    checked before written."""
    tied_head = {"lm_head.weight": "embed.weight"} if model.config.tie_word_embeddings else {}
    load_state(model, files, name_map(model.config), architecture="GPT-2", canonical=_canonical,
               ignore=_MASK_BUFFER.fullmatch, transposed=_is_conv1d, tied=tied_head)


def state_dict_for_hf(model):
    """{GPT-2 name under "transformer.": array} in GPT2LMHeadModel's layout, in the model's dtype."""
    own = model.state_dict()
    out = {}
    for hf, dst in name_map(model.config):
        array = np.concatenate([own[n] for n in dst], axis=0) if len(dst) > 1 else own[dst[0]]
        array = array.T if _is_conv1d(hf) else array
        name = hf if hf == "lm_head.weight" else "transformer." + hf
        out[name] = np.ascontiguousarray(array)
    return out


def save(model, folder):
    """Write config.json and model.safetensors as transformers' GPT2LMHeadModel.save_pretrained does."""
    save_folder(folder, state_dict_for_hf(model), config_from_model(model))

"""Hugging Face llama / qwen2 / mistral folders <-> fastlora's Llama: the config and the weights.

The Llama keeps transformers' parameter names, so weights map one to one; only config.json
needs translating. Fields that change the model in a way the Llama cannot represent are
refused, naming the field: a RoPE scaling other than linear or llama3, partial rotary
embeddings, an activation other than SiLU, or a sliding window shorter than the context.
"""
import numpy as np

from fastlora.nn.hf_files import WeightFiles, load_state, save_folder
from fastlora.nn.llama import ROPE_TYPES, Llama, LlamaConfig

MODEL_TYPES = ("llama", "qwen2", "mistral")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def _rope(config, where):
    """(rope_theta, rope_scaling) from transformers 5's rope_parameters or 4's rope_theta + rope_scaling."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}: rope_scaling type {rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor {params['partial_rotary_factor']} is not supported "
                         "(fastlora rotates every dimension of a head)")
    needs = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
    missing = [k for k in needs if k not in params]
    if missing:
        raise ValueError(f"{where}: rope_scaling of type {rope_type!r} needs {missing}")
    scaling = {}
    if rope_type != "default":
        scaling = {"rope_type": rope_type, **{k: float(params[k]) for k in needs}}
    if rope_type == "llama3":
        scaling["original_max_position_embeddings"] = int(params.get(
            "original_max_position_embeddings", config.get("max_position_embeddings")))
    return theta, scaling


def config_to_kwargs(config, where):
    """A llama/qwen2/mistral config.json dict -> LlamaConfig fields; ValueError naming the field it cannot represent."""
    model_type = config["model_type"]
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (fastlora's MLP is SwiGLU)")
    try:
        context = int(config["max_position_embeddings"])
        kwargs = dict(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                      intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
                      num_heads=config["num_attention_heads"], max_seq_len=context)
    except KeyError as exc:
        raise ValueError(f"{where}: missing required field {exc.args[0]!r}") from None
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and window < context:
        raise ValueError(f"{where}: sliding_window={window} is shorter than the context "
                         f"(max_position_embeddings={context}); fastlora attends to the whole context")
    theta, scaling = _rope(config, where)
    attention_bias = bool(config.get("attention_bias", False))
    kwargs.update(num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                  head_dim=config.get("head_dim"), rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                  rope_theta=theta, rope_scaling=scaling,
                  qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias,
                  mlp_bias=bool(config.get("mlp_bias", False)),
                  tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))
    return kwargs


def from_folder(folder, config, dtype, where):
    files = WeightFiles(folder)
    try:
        llama_config = LlamaConfig(**config_to_kwargs(config, where))
        llama_config.validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    files.check_holds(llama_config, where)
    model = Llama(llama_config, dtype=dtype)
    names = [(n, [n]) for n, _ in model.named_parameters()]
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if model.config.tie_word_embeddings else {}
    load_state(model, files, names, architecture=config["model_type"], tied=tied,
               ignore=lambda n: n.endswith("rotary_emb.inv_freq"))  # a buffer older checkpoints carry
    model.hf_config = dict(config)
    return model


def config_from_model(model):
    """config.json for `model`: its own fields, over those it was loaded with."""
    c = model.config
    config = dict(model.hf_config or {})
    model_type = config.get("model_type") or ("qwen2" if c.qkv_bias and not c.o_bias else "llama")
    if model_type == "qwen2" and (c.o_bias or not c.qkv_bias):
        model_type = "llama"  # Qwen2 always has q/k/v biases and never an o_proj bias
    rope = {"rope_type": c.rope_scaling.get("rope_type", "default"), "rope_theta": c.rope_theta,
            **{k: v for k, v in c.rope_scaling.items() if k != "rope_type"}}
    for old in ("rope_scaling", "rope_theta", "torch_dtype"):  # transformers 4's names for these
        config.pop(old, None)
    config.update(model_type=model_type, architectures=[_ARCHITECTURES[model_type]], vocab_size=c.vocab_size,
                  hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                  num_key_value_heads=c.num_kv_heads, head_dim=c.dim_per_head,
                  max_position_embeddings=c.max_seq_len, rms_norm_eps=c.rms_norm_eps, hidden_act="silu",
                  rope_parameters=rope, mlp_bias=c.mlp_bias, tie_word_embeddings=c.tie_word_embeddings,
                  dtype=str(model.dtype))
    if model_type == "llama":
        config["attention_bias"] = c.o_bias
    return config


def save(model, folder):
    """Write config.json and model.safetensors as transformers' save_pretrained does (lm_head left out when tied)."""
    tensors = {name: np.ascontiguousarray(p.data) for name, p in model.named_parameters()}
    save_folder(folder, tensors, config_from_model(model))

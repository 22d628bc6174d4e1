"""One training step of docs/DESIGN.md's benchmark workloads, in fastlora and in its PyTorch peers.

A step: forward, masked cross-entropy, backward, gradient clipping to norm 1.0, AdamW update.
Full fine-tuning trains every parameter; LoRA has rank 8, alpha 16 on `lora_targets`:
q_proj and v_proj of the GPT (c_attn, GPT-2's fused q/k/v, in PEFT: what a transformers user
adapts), all seven projections of a Llama.

Frameworks (`make_step(framework, workload, mode)` -> (step function, tokens per step)):
- "fastlora": fl.GPT or fl.Llama, the loss through `model.loss` (the fused head,
  fastlora.nn.head: no (B, T, V) logits);
- "torch": the same GPT written in PyTorch eager (fastlora.testing.torch_reference), LoRA as
  PEFT's forward; GPT workloads only;
- "hf": transformers' GPT2LMHeadModel / LlamaForCausalLM (its default attention, SDPA) and,
  for LoRA, PEFT's get_peft_model: what a PyTorch user would run. Dropout is off, as in the others.

Each process builds only its own model: the peers draw their own initial weights (so their
peak memory holds one model), unless same_weights=True, which copies fastlora's weights and
adapters in (for the checks that the frameworks compute the same step, not for timing).
"""
import numpy as np

import fastlora as fl
from workloads import arch, batch, build_model, model_config

_runtime = None


def _enter_runtime():
    """A process that builds a step to time trains from then on: it runs inside fastlora.runtime()
    (malloc keeps step buffers, as Trainer.train does), whichever framework it times, so the peers
    get the same allocator as fastlora and as every earlier figure in bench/README.md. Entered
    when a step is built, not at import: a process that only reads this module's tables (the
    comparison's parent, a test) keeps its own BLAS and malloc settings."""
    global _runtime
    if _runtime is None:
        _runtime = fl.runtime()
        _runtime.__enter__()

LORA = dict(rank=8, alpha=16.0)
GPT_LORA_TARGETS = ("q_proj", "v_proj")
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FRAMEWORKS = ("fastlora", "torch", "hf")


def lora_targets(workload):
    return LLAMA_LORA_TARGETS if arch(workload) == "llama" else GPT_LORA_TARGETS


def fastlora_model(workload, mode, seed=0):
    """(model, trainable parameters) of a workload: the GPT or Llama, or a LoRAModel over it."""
    model = build_model(workload, seed)
    if mode != "lora":
        return model, list(model.parameters())
    model = fl.LoRAModel(model, target_modules=list(lora_targets(workload)), rank=LORA["rank"],
                         alpha=LORA["alpha"])
    model.inject_lora()
    return model, model.lora_parameters()


def fastlora_step(workload, mode, seed=0, fused=True):
    model, params = fastlora_model(workload, mode, seed)
    return step_of(model, params, workload, seed, fused)


def step_of(model, params, workload, seed=0, fused=True):
    """(the docs/DESIGN.md step of `model` training `params` on the workload's batch, tokens per step).
    fused=False scores the whole logits array instead (cross_entropy(model(ids), labels))."""
    _enter_runtime()
    opt = fl.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids, labels = batch(workload, seed)

    def step():
        opt.zero_grad()
        loss = model.loss(ids, labels) if fused else fl.cross_entropy(model(ids), labels)
        loss.backward()
        fl.clip_grad_norm(params, 1.0)
        opt.step()
        return float(loss.data)

    return step, ids.size


def _torch_adam_step(model_loss, params, ids, labels):
    import torch
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model_loss(ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    return step, int(ids.numel())


def torch_step(workload, mode, seed=0, same_weights=False):
    import torch
    from fastlora.testing.torch_reference import TorchGPT, torch_gpt_from, torch_loss
    if arch(workload) != "gpt":
        raise ValueError(f"the 'torch' peer is the GPT in PyTorch; {workload!r} is a {arch(workload)} workload")
    if same_weights:
        ours, _ = fastlora_model(workload, mode, seed)  # the same weights and adapter init as fastlora's
        peer = torch_gpt_from(fl.GPT(**model_config(workload), seed=seed))
    else:
        torch.manual_seed(seed)
        ours, peer = None, TorchGPT(**model_config(workload))
    if mode == "lora":
        peer.requires_grad_(False)
        params = [p for layer in _torch_lora(peer, ours, workload, seed).values()
                  for p in (layer.lora_A, layer.lora_B)]
    else:
        params = list(peer.parameters())
    ids, labels = (torch.from_numpy(a) for a in batch(workload, seed))
    return _torch_adam_step(lambda i, l: torch_loss(peer(i), l), params, ids, labels)


def _torch_lora(peer, ours, workload, seed):
    """LoRA layers on the torch GPT: fastlora's own adapters (ours), or fresh ones as PEFT makes
    them (A Kaiming-uniform, B zero) on lora_targets."""
    from fastlora.testing.torch_reference import TorchLoRALinear, inject_torch_lora
    if ours is not None:
        return inject_torch_lora(peer, ours)
    rng = np.random.default_rng(seed)
    layers, scaling = {}, LORA["alpha"] / LORA["rank"]
    for path, module in list(peer.named_modules()):
        parent, _, name = path.rpartition(".")
        if name in lora_targets(workload):
            bound = 1.0 / np.sqrt(module.in_features)
            A = rng.uniform(-bound, bound, (LORA["rank"], module.in_features)).astype(np.float32)
            B = np.zeros((module.out_features, LORA["rank"]), np.float32)
            layers[path] = TorchLoRALinear(module, A, B, scaling)
            setattr(peer.get_submodule(parent), name, layers[path])
    return layers


def hf_config(workload):
    """The transformers config of a workload's model, dropout off."""
    import transformers
    w = model_config(workload)
    if arch(workload) == "llama":
        return transformers.LlamaConfig(
            vocab_size=w["vocab_size"], hidden_size=w["hidden_size"], intermediate_size=w["intermediate_size"],
            num_hidden_layers=w["num_layers"], num_attention_heads=w["num_heads"],
            num_key_value_heads=w["num_kv_heads"], max_position_embeddings=w["max_seq_len"],
            rms_norm_eps=w.get("rms_norm_eps", 1e-6), rope_theta=w.get("rope_theta", 10000.0),
            tie_word_embeddings=w.get("tie_word_embeddings", False), attention_dropout=0.0)
    return transformers.GPT2Config(vocab_size=w["vocab_size"], n_embd=w["embed_dim"], n_head=w["num_heads"],
                                   n_layer=w["num_layers"], n_positions=w["max_seq_len"],
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def hf_lora_config():
    """PEFT's LoraConfig of the step: c_attn for GPT-2, the seven projections for a Llama."""
    import peft
    return {"gpt": peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules=["c_attn"],
                                   lora_dropout=0.0, fan_in_fan_out=True, task_type="CAUSAL_LM"),
            "llama": peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                                     target_modules=list(LLAMA_LORA_TARGETS), lora_dropout=0.0,
                                     task_type="CAUSAL_LM")}


def hf_model(workload, seed=0, same_weights=False):
    """transformers' model of the workload in train mode: fresh weights, or fastlora's (same_weights)."""
    import tempfile

    import torch
    import transformers
    torch.manual_seed(seed)
    if not same_weights:
        return transformers.AutoModelForCausalLM.from_config(hf_config(workload)).train()
    with tempfile.TemporaryDirectory() as folder:
        build_model(workload, seed).save_pretrained(folder)
        return transformers.AutoModelForCausalLM.from_pretrained(folder).train()


def hf_step(workload, mode, seed=0, same_weights=False):
    import torch
    model = hf_model(workload, seed, same_weights)
    if mode == "lora":
        import peft
        model = peft.get_peft_model(model, hf_lora_config()[arch(workload)])
    params = [p for p in model.parameters() if p.requires_grad]
    ids, labels = (torch.from_numpy(a) for a in batch(workload, seed))
    return _torch_adam_step(lambda i, l: model(input_ids=i, labels=l).loss, params, ids, labels)


def make_step(framework, workload, mode, seed=0, same_weights=False):
    _enter_runtime()
    if framework == "fastlora":
        return fastlora_step(workload, mode, seed)
    if framework == "torch":
        return torch_step(workload, mode, seed, same_weights)
    if framework == "hf":
        return hf_step(workload, mode, seed, same_weights)
    raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")


def peers(workload):
    """The peers a workload is compared with: the torch GPT where there is one, and transformers
    (+ PEFT) for the real-model shapes."""
    out = ["torch"] if arch(workload) == "gpt" else []
    if workload in ("gpt2", "smollm2") or arch(workload) == "llama":
        out.append("hf")
    return out


def check_losses_agree(workload, mode, steps=3, peer="torch"):
    """fastlora's and a peer's first losses on the same model and batch (same_weights)."""
    a, _ = make_step("fastlora", workload, mode)
    b, _ = make_step(peer, workload, mode, same_weights=True)
    return [(a(), b()) for _ in range(steps)]


__all__ = ["make_step", "check_losses_agree", "peers", "np"]

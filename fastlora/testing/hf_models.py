"""Tiny random Hugging Face models built with transformers at test time (nothing is downloaded).

Imports torch and transformers; used by the interop tests and benchmarks only.
"""
import numpy as np
import torch
import transformers


def make_gpt2(folder=None, seed=0, spread=0.05, **overrides):
    """A random GPT2LMHeadModel in eval mode, saved to `folder` when given.

    Every weight gets N(0, spread) noise on top of transformers' init (which zeroes biases and
    sets LayerNorm to 1), so each term of the model shows in its outputs.
    """
    torch.manual_seed(seed)
    kw = dict(vocab_size=61, n_positions=20, n_layer=2, n_embd=16, n_head=4, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * spread)
    if folder is not None:
        model.save_pretrained(folder)
    return model


def logits(model, input_ids):
    """A transformers (or PEFT) causal LM's logits for int array input_ids, as float32 NumPy."""
    with torch.no_grad():
        return model(torch.tensor(np.asarray(input_ids))).logits.float().numpy()


def make_gpt2_tokenizer(folder, texts, vocab_size=300, eos="<|endoftext|>"):
    """A byte-level BPE trained by `tokenizers` on `texts`, saved as GPT2TokenizerFast saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    hf = transformers.GPT2TokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos)
    hf.save_pretrained(folder)
    return hf


def make_chat_tokenizer(folder, texts, chat_template=None):
    """make_gpt2_tokenizer with ChatML's markers as special tokens and `chat_template`, saved."""
    hf = make_gpt2_tokenizer(folder, texts)
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.chat_template = chat_template
    hf.save_pretrained(folder)
    return hf


_LLAMA_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                  "mistral": ("MistralConfig", "MistralForCausalLM")}


def make_llama(folder=None, model_type="llama", seed=0, spread=0.05, **overrides):
    """A random Llama-family model (llama, qwen2 or mistral) of transformers, in eval mode, saved when asked."""
    torch.manual_seed(seed)
    config_cls, model_cls = (getattr(transformers, n) for n in _LLAMA_CLASSES[model_type])
    kw = dict(vocab_size=67, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
    if model_type == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    model = model_cls(config_cls(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * spread)
    if folder is not None:
        model.save_pretrained(folder)
    return model


def backward_both(model, hf_model, input_ids, masked=5):
    """The masked next-token loss of a fastlora model and a transformers one on the same ids (the
    first `masked` labels of each row -100), backward on both -> (ours, theirs) as floats."""
    from fastlora.autograd import cross_entropy
    labels = np.array(input_ids, copy=True)
    labels[:, :masked] = -100
    theirs = hf_model(torch.tensor(np.asarray(input_ids)), labels=torch.tensor(labels)).loss
    theirs.backward()
    ours = cross_entropy(model(input_ids), labels)
    ours.backward()
    return float(ours.data), theirs.item()

"""The benchmark tools themselves: the step's FLOP count and bench/compare_torch.py's table."""
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench")
sys.path.insert(0, BENCH)

from workloads import ALL_WORKLOADS, LLAMA_WORKLOADS, WORKLOADS, model_config, scored_rows, step_flops  # noqa: E402


def test_step_flops_counts_the_linears_the_attention_and_the_scored_head_rows():
    w = WORKLOADS["tiny"]  # B 2, T 64, D 32, L 2, V 100
    tokens, D, L, V, T = 2 * 64, 32, 2, 100, 64
    assert (w["batch_size"], w["max_seq_len"], w["embed_dim"], w["num_layers"], w["vocab_size"]) == (2, T, D, L, V)
    scored = 2 * (T - T // 4)  # the first quarter of each row's labels is -100, and the last position has none
    assert scored_rows("tiny") == scored
    linear = 2 * tokens * 12 * D * D * L + 2 * scored * V * D
    attention = 4 * tokens * T * D * L
    assert step_flops("tiny", "lora") == 2 * linear + 3 * attention
    assert step_flops("tiny", "full") == 3 * linear + 3 * attention


def test_step_flops_of_a_llama_counts_grouped_heads_and_the_swiglu():
    w = LLAMA_WORKLOADS["smollm2"]
    assert (w["hidden_size"], w["num_heads"], w["num_kv_heads"], w["intermediate_size"], w["num_layers"]) == \
        (576, 9, 3, 1536, 30)
    tokens, T, D, hd, I, V = 4 * 256, 256, 576, 64, 1536, 49152
    body = 30 * (D * 9 * hd * 2 + D * 3 * hd * 2 + 3 * D * I)
    linear = 2 * tokens * body + 2 * scored_rows("smollm2") * V * D
    assert step_flops("smollm2", "lora") == 2 * linear + 3 * 4 * tokens * T * 9 * hd * 30


def test_workloads_build_their_models():
    """Every workload's config is its model's (GPT or Llama) keyword arguments."""
    import fastlora as fl
    assert {"tiny", "small", "base", "gpt2"} <= set(WORKLOADS) and {"smollm2", "tiny-llama"} <= set(LLAMA_WORKLOADS)
    assert set(ALL_WORKLOADS) == set(WORKLOADS) | set(LLAMA_WORKLOADS)
    for name in ALL_WORKLOADS:
        cls = fl.Llama if name in LLAMA_WORKLOADS else fl.GPT
        cfg = model_config(name)
        config = fl.nn.LlamaConfig(**cfg) if cls is fl.Llama else fl.nn.GPTConfig(**cfg)
        config.validate()


def test_compare_torch_prints_a_row_per_cell(capsys):
    pytest.importorskip("torch", reason="compare_torch runs PyTorch as the peer")
    import compare_torch
    assert compare_torch.main(["--workloads", "tiny", "--modes", "lora", "--rounds", "1", "--steps", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("tiny"))
    fields = row.split()
    assert fields[:2] == ["tiny", "lora"] and float(fields[4]) > 0  # the ratio column


def test_compare_torch_runs_transformers_and_peft_on_a_llama(capsys):
    pytest.importorskip("peft", reason="the HF+PEFT peer needs transformers and peft")
    import compare_torch
    assert compare_torch.main(["--workloads", "tiny-llama", "--modes", "lora", "--rounds", "1", "--steps", "1"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny-llama"))
    fields = row.split()
    assert fields[2:5] == fields[2:3] + ["-", "-"]  # no torch GPT for a Llama
    assert float(fields[-3]) > 0 and float(fields[-1]) > 0  # HF+PEFT's ratio and memory ratio

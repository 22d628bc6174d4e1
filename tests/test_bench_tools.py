"""The benchmark tools themselves: the step's FLOP count and bench/compare_torch.py's table."""
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench")
sys.path.insert(0, BENCH)

from workloads import WORKLOADS, step_flops  # noqa: E402


def test_step_flops_counts_the_linears_and_the_attention():
    w = WORKLOADS["tiny"]  # B 2, T 64, D 32, L 2, V 100
    tokens, D, L, V, T = 2 * 64, 32, 2, 100, 64
    assert (w["batch_size"], w["max_seq_len"], w["embed_dim"], w["num_layers"], w["vocab_size"]) == (2, T, D, L, V)
    linear = 2 * tokens * (12 * D * D * L + V * D)
    attention = 4 * tokens * T * D * L
    assert step_flops("tiny", "lora") == 2 * linear + 3 * attention
    assert step_flops("tiny", "full") == 3 * linear + 3 * attention


def test_compare_torch_prints_a_row_per_cell(capsys):
    pytest.importorskip("torch", reason="compare_torch runs PyTorch as the peer")
    import compare_torch
    assert compare_torch.main(["--workloads", "tiny", "--modes", "lora", "--rounds", "1", "--steps", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("tiny"))
    fields = row.split()
    assert fields[:2] == ["tiny", "lora"] and float(fields[4]) > 0  # the ratio column

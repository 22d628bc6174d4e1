"""Every Cython kernel has a NumPy twin and a test that runs the two against each other
(STYLE.md 4; as bottleneck's registry of functions and their slow versions).

KERNELS names, for each csrc/<module>.pyx, its twins and a test comparing fast against slow.
A new .pyx without an entry, a twin that does not exist, or a named test that is gone fails
here: add the twin to fastlora/reference/ and its test before the kernel lands.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"

# csrc module -> (twins: "module:function", importable; tests that compare fast with a twin)
KERNELS = {
    "adamw": (["fastlora.reference.optim:adamw_update"], ["test_optim_kernels.py::test_adamw_update_matches_reference"]),
    "attention": (["fastlora.reference:causal_attention_forward", "fastlora.reference:causal_attention_backward"],
                  ["test_gemm_attention.py::test_attention_matches_reference"]),
    "attention_softmax": (["fastlora.reference:causal_softmax_forward", "fastlora.reference:causal_softmax_backward"],
                          ["test_kernels.py::test_causal_softmax_matches_reference"]),
    # the CBLAS pointers the kernels cimport; its sgemm/dgemm are NumPy's matmul, compared through gemm
    "blas": (["numpy:matmul"], ["test_gemm_attention.py::test_gemm_matches_numpy"]),
    "bpe": (["fastlora.reference.bpe:train_merges", "fastlora.reference.bpe:encode_words",
             "fastlora.reference.bpe:build_merge_table"],
            ["test_data_bpe_kernels.py::test_train_and_encode_match_the_reference",
             "test_data_bpe_kernels.py::test_encoding_unseen_words_matches_the_reference"]),
    "clip_grad": (["fastlora.reference.optim:grad_norm", "fastlora.reference.optim:scale_grads"],
                  ["test_optim_kernels.py::test_grad_norm_and_scale_match_reference"]),
    "cross_entropy": (["fastlora.reference:cross_entropy_forward"],
                      ["test_kernels.py::test_cross_entropy_matches_reference"]),
    "dora": (["fastlora.reference.dora:dora_forward", "fastlora.reference.dora:dora_backward",
              "fastlora.reference.dora:dora_weight_norm"], ["test_lora_dora.py::test_op_matches_reference"]),
    "embedding": (["fastlora.reference:embedding_backward"],
                  ["test_kernels.py::test_embedding_backward_matches_reference"]),
    "gelu": (["fastlora.reference:gelu_forward", "fastlora.reference:gelu_backward"],
             ["test_kernels.py::test_gelu_matches_reference"]),
    "gemm": (["numpy:matmul"], ["test_gemm_attention.py::test_gemm_matches_numpy"]),  # its twin is NumPy's
    "layernorm": (["fastlora.reference:layernorm_forward", "fastlora.reference:layernorm_backward"],
                  ["test_kernels.py::test_layernorm_matches_reference"]),
    "linear_cross_entropy": (["fastlora.reference:linear_cross_entropy_forward"],
                             ["test_kernels.py::test_linear_cross_entropy_matches_reference"]),
    "lora": (["fastlora.reference.lora:lora_dropout_forward", "fastlora.reference.lora:lora_dropout_backward"],
             ["test_lora_ops.py::test_dropout_kernel_matches_reference"]),
    "lora_linear": (["fastlora.reference.lora:lora_linear_forward", "fastlora.reference.lora:lora_linear_backward"],
                    ["test_lora_ops.py::test_op_matches_reference"]),
    "nf4": (["fastlora.reference.nf4:quantize_blocks", "fastlora.reference.nf4:dequantize_blocks",
             "fastlora.reference.nf4:quantize_absmax", "fastlora.reference.nf4:dequantize_absmax"],
            ["test_nf4.py::test_kernels_match_reference_bit_for_bit"]),
    "rmsnorm": (["fastlora.reference:rmsnorm_forward", "fastlora.reference:rmsnorm_backward"],
                ["test_kernels.py::test_rmsnorm_matches_reference"]),
    "rope": (["fastlora.reference:rope_forward", "fastlora.reference:rope_backward"],
             ["test_kernels.py::test_rope_matches_reference"]),
    "sgd": (["fastlora.reference.optim:sgd_update"], ["test_optim_kernels.py::test_sgd_update_matches_reference"]),
    "swiglu": (["fastlora.reference:silu_mul_forward", "fastlora.reference:silu_mul_backward"],
               ["test_kernels.py::test_silu_mul_matches_reference"]),
}


def test_every_kernel_module_is_registered():
    modules = {p.stem for p in (ROOT / "csrc").glob("*.pyx")}
    assert sorted(modules - set(KERNELS)) == [], "kernels without a twin and a twin test in KERNELS"
    assert sorted(set(KERNELS) - modules) == [], "KERNELS names modules csrc/ no longer has"


@pytest.mark.parametrize("module", sorted(KERNELS))
def test_twins_exist(module):
    import importlib
    twins, _ = KERNELS[module]
    assert twins, f"{module} names no twin"
    for twin in twins:
        where, name = twin.split(":")
        assert callable(getattr(importlib.import_module(where), name, None)), f"{module}: no twin {twin}"


def _test_functions(file):
    tree = ast.parse((TESTS / file).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("module", sorted(KERNELS))
def test_twin_tests_exist_and_call_the_twin(module):
    twins, tests = KERNELS[module]
    assert tests, f"{module} names no twin test"
    source = ""
    for test in tests:
        file, name = test.split("::")
        assert (TESTS / file).exists(), f"{module}: no test file {file}"
        assert name in _test_functions(file), f"{module}: no test {test}"
        source += (TESTS / file).read_text()
    for twin in twins:  # the file that holds a twin test names each twin (or NumPy's) it compares with
        assert twin.split(":")[1] in source, f"{module}: {twin} appears in none of {tests}"

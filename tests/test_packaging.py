"""What ships: py.typed with type hints that resolve on the public API, one version number, the
license the metadata names, and an sdist that carries what its tests need."""
import inspect
import re
import typing
from pathlib import Path

import pytest

import fastlora as fl

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")

# the public API's annotated entry points: every parameter and the return value have a hint
TYPED = [fl.cross_entropy, fl.no_grad, fl.Tensor.__init__, fl.Tensor.backward, fl.SGD.__init__, fl.AdamW.__init__,
         fl.AdamW.step, fl.AdamW.zero_grad, fl.clip_grad_norm, fl.WarmupCosineSchedule.__init__, fl.from_pretrained,
         fl.load_tokenizer, fl.BPETokenizer.train, fl.BPETokenizer.encode, fl.BPETokenizer.decode,
         fl.CharTokenizer.from_texts, fl.FinetuneDataset.__init__, fl.HFTokenizer.encode, fl.HFTokenizer.decode,
         fl.HFTokenizer.apply_chat_template, fl.InstructionFormatter.format, fl.InstructionFormatter.prompt,
         fl.DataCollator.__init__, fl.DataLoader.__init__, fl.train_test_split, fl.Trainer.__init__, fl.Trainer.train,
         fl.Trainer.evaluate, fl.Trainer.save_checkpoint, fl.Trainer.load_checkpoint, fl.LoRAModel.__init__,
         fl.LoRAModel.inject_lora, fl.LoRAModel.save_pretrained, fl.LoRAModel.merge_and_unload, fl.LoRAMerger.merge,
         fl.apply_lora, fl.get_lora_parameters, fl.merge_lora, fl.unmerge_lora, fl.disable_lora, fl.enable_lora,
         fl.quantize_nf4, fl.dequantize_nf4, fl.apply_qlora, fl.get_qlora_parameters, fl.Benchmark.__init__,
         fl.Benchmark.evaluate, fl.Benchmark.compare, fl.format_table, fl.train_full_finetune, fl.train_lora,
         fl.train_qlora, fl.set_verbosity, fl.get_verbosity, fl.get_num_threads, fl.set_num_threads]


def test_py_typed_is_shipped():
    assert (ROOT / "fastlora" / "py.typed").exists()
    assert '"py.typed"' in PYPROJECT.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]


def test_every_public_annotation_resolves():
    """typing.get_type_hints evaluates each annotation as a type checker would (a name it cannot
    find is an error), over every callable fastlora exports."""
    for name in fl.__all__:
        obj = getattr(fl, name)
        for target in ([obj.__init__] if inspect.isclass(obj) else [obj]):
            if callable(target):
                typing.get_type_hints(target)


@pytest.mark.parametrize("fn", TYPED, ids=[f.__qualname__ for f in TYPED])
def test_public_entry_points_are_annotated(fn):
    fn = inspect.unwrap(fn)
    hints = typing.get_type_hints(fn)
    parameters = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("self", "cls")]
    missing = [p.name for p in parameters if p.name not in hints]
    assert not missing and "return" in hints, (fn.__qualname__, missing)


def test_one_version_number():
    assert re.search(r'^version = "(.*)"$', PYPROJECT, re.M).group(1) == fl.__version__


def test_the_license_the_metadata_names_is_there():
    assert re.search(r'^license = "(.*)"$', PYPROJECT, re.M).group(1) == "MIT"
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    assert 'license-files = ["LICENSE"]' in PYPROJECT


def test_the_sdist_carries_what_its_tests_need():
    """MANIFEST.in grafts tests/ (conftest.py with it) and what tests read outside the package."""
    manifest = (ROOT / "MANIFEST.in").read_text(encoding="utf-8").split()
    for folder in ("tests", "bench", "docs", "scripts"):
        assert any(a == "graft" and b == folder for a, b in zip(manifest, manifest[1:])), folder
    assert "LICENSE" in manifest and "CHANGELOG.md" in manifest

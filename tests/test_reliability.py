"""Issue 19's probes as tests: good state is never lost, hostile files cost bounded memory, errors are honest.

Each test is one failure the probes found: NaN weights saved and called good, LoRA dropout not
resuming exactly, a finished run overwritten, an unwritable or shared --out, a half-applied
load_checkpoint, temporaries left by killed saves, a resume with another lr or data; sparse,
oversized and panicking safetensors files, a 1e7 vocab_size, deeply nested JSON, chained BPE
merges; programming bugs shown as bad input and one-line errors that do not name their file.
"""
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest
from safetensors import safe_open

import fastlora as fl
from fastlora.cli import main
from fastlora.data import BPETokenizer, CharTokenizer, FinetuneDataset, InstructionFormatter
from fastlora.errors import FastloraError
from fastlora.io import load_safetensors, read_json, save_safetensors
from fastlora.optim import AdamW
from fastlora.tasks import make_examples
from fastlora.train import Trainer, TrainingDiverged
from fastlora.train.checkpoint import rng_generators

RECORDS = make_examples(16, seed=5)


@pytest.fixture(scope="module")
def tok():
    fmt = InstructionFormatter()
    return CharTokenizer.from_texts([fmt.format(r["instruction"], r["input"], r["output"]) for r in RECORDS])


def _gpt(tok, **kw):
    return fl.GPT(vocab_size=tok.vocab_size, embed_dim=16, num_heads=2, num_layers=1, max_seq_len=128, seed=1, **kw)


def _trainer(tok, model=None, params=None, lr=3e-3, records=RECORDS, **kw):
    model = model if model is not None else _gpt(tok)
    params = params if params is not None else model.parameters()
    ds = FinetuneDataset(records, tok, max_length=128)
    return Trainer(model, AdamW(params, lr=lr), ds, batch_size=4, epochs=2, seed=3, progress=False, **kw)


def _state(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _rewrite(path, edit):
    """Apply edit(state, arrays) to a checkpoint file in place (its JSON state and its arrays)."""
    with safe_open(str(path), framework="numpy") as f:
        meta, arrays = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(meta["fastlora_checkpoint"])
    edit(state, arrays)
    save_safetensors(path, arrays, metadata={"fastlora_checkpoint": json.dumps(state)})


# --- 1. never lose good state -------------------------------------------------------------------------

def test_weights_made_non_finite_are_never_saved_and_the_stop_names_the_last_good_checkpoint(tok, tmp_path):
    trainer = _trainer(tok, checkpoint_dir=tmp_path, save_every=1)
    real_step = trainer.optimizer.step

    def overflow_at_step_3():  # what --lr 1e300 does: the update leaves infinities in the weights
        real_step()
        if trainer.step == 3:
            trainer.model.blocks[0].mlp.fc1.weight.data[...] = np.inf

    trainer.optimizer.step = overflow_at_step_3
    with pytest.warns(RuntimeWarning, match="not finite"), pytest.raises(TrainingDiverged) as err:
        trainer.train()
    path = str(tmp_path / "checkpoint.safetensors")
    assert f"the last good checkpoint is {path}" in str(err.value)
    saved = json.loads((tmp_path / "checkpoint.safetensors.json").read_text())
    # the save of step 4's state waited for step 4's loss, which was NaN: step 3's is the last written
    assert saved["step"] == 3
    with safe_open(path, framework="numpy") as f:
        assert all(np.isfinite(f.get_tensor(k)).all() for k in f.keys())


def test_a_save_of_non_finite_weights_is_refused_and_names_the_last_good_one(tok, tmp_path):
    trainer = _trainer(tok, checkpoint_dir=tmp_path, max_steps=2)
    trainer.train()
    good = (tmp_path / "checkpoint.safetensors").read_bytes()
    trainer.model.ln_f.weight.data[0] = np.nan
    trainer.total_steps = 2  # nothing left to do: train() goes straight to its final save
    with pytest.raises(TrainingDiverged, match=r"weight ln_f.weight holds NaN.*the last good checkpoint is"):
        trainer.train()
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == good


def test_a_trainer_does_not_train_over_a_checkpoint_it_did_not_load(tok, tmp_path):
    _trainer(tok, checkpoint_dir=tmp_path, max_steps=1).train()
    finished = (tmp_path / "checkpoint.safetensors").read_bytes()
    with pytest.raises(FastloraError, match="an earlier run's checkpoint; resume it with load_checkpoint"):
        _trainer(tok, checkpoint_dir=tmp_path, max_steps=1).train()
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == finished
    again = _trainer(tok, checkpoint_dir=tmp_path, max_steps=2)
    again.load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert len(again.train()) == 2


def test_lora_dropout_resumes_exactly(tok, tmp_path):
    def fresh():
        lm = fl.LoRAModel(_gpt(tok), target_modules=["q_proj", "v_proj", "fc1"], rank=4, dropout=0.3, seed=2)
        lm.inject_lora()
        return _trainer(tok, model=lm, params=lm.lora_parameters())

    assert any(key.endswith(":_rng") for key, _ in rng_generators(fresh().model))
    full = fresh()
    full_losses = full.train()
    first = fresh()
    first.total_steps = 3
    first.train()
    first.save_checkpoint(tmp_path / "c.safetensors")
    resumed = fresh()
    resumed.load_checkpoint(tmp_path / "c.safetensors")
    assert resumed.train() == full_losses
    assert _same(resumed.model.state_dict(), full.model.state_dict())


def _edit_losses(s, a):
    s["losses"] = "oops"


def _edit_evals(s, a):
    s["eval_losses"] = [[1, "x"]]


def _edit_rngs(s, a):
    key = next(iter(s["model_rngs"]))
    s["model_rngs"][key] = {"bit_generator": "PCG64", "state": "garbage"}


def _edit_rng_key(s, a):
    s["model_rngs"] = {"blocks.7.nowhere": {}}


def _edit_negative_step(s, a):
    s["step"] = -5


def _edit_huge_step(s, a):
    s["step"] = 10 ** 9


def _edit_position(s, a):
    s["batch_in_epoch"] = 0


def _edit_nan_optimizer(s, a):
    a["optimizer.0.exp_avg"][0] = np.nan


def _edit_schedule(s, a):
    s["schedule"]["last_step"] = -1


@pytest.mark.parametrize("edit,match", [
    (_edit_losses, "'losses' must be a list of 3 numbers"),
    (_edit_evals, "'eval_losses' must be a list of"),
    (_edit_rngs, "the RNG state for '[a-z_.0-9]+' is invalid"),
    (_edit_rng_key, "RNG state for 'blocks.7.nowhere', which this model does not have"),
    (_edit_negative_step, "'step' must be an int >= 0, got -5"),
    (_edit_huge_step, "at step 1000000000, past the 8 steps"),
    (_edit_position, "at step 3, but its data position"),
    (_edit_nan_optimizer, "optimizer buffer 0.exp_avg holds NaN or infinite values"),
    (_edit_schedule, "'schedule' is invalid"),
])
def test_a_bad_checkpoint_is_refused_before_anything_changes(tok, tmp_path, edit, match):
    donor = _trainer(tok, model=_gpt(tok, dropout=0.1), max_steps=3)
    donor.train()
    path = tmp_path / "c.safetensors"
    donor.save_checkpoint(path)
    _rewrite(path, edit)
    target = _trainer(tok, model=_gpt(tok, dropout=0.1))
    weights, optim = _state(target.model), target.optimizer.state_dict()
    rngs = {k: r.bit_generator.state for k, r in rng_generators(target.model)}
    with pytest.raises(FastloraError, match=match) as err:
        target.load_checkpoint(path)
    assert str(path) in str(err.value)
    assert target.step == 0 and target.losses == [] and target.last_checkpoint is None
    assert _same(_state(target.model), weights)
    assert target.optimizer.state_dict()["step"] == optim["step"] == 0
    assert {k: r.bit_generator.state for k, r in rng_generators(target.model)} == rngs


def test_resume_with_another_lr_or_data_says_what_changed_and_needs_allowing(tok, tmp_path):
    first = _trainer(tok, max_steps=2)
    first.train()
    path = tmp_path / "c.safetensors"
    first.save_checkpoint(path)
    faster = _trainer(tok, lr=1e-2)
    changed = r"differs from the checkpoint's in lr 0\.01 \(the checkpoint's run: 0\.003\)"
    with pytest.raises(FastloraError, match=changed):
        faster.load_checkpoint(path)
    faster.load_checkpoint(path, allow_changes=True)
    assert faster.step == 2 and faster.schedule.base_lrs == [1e-2]
    other = [dict(r, output=r["output"][::-1]) for r in RECORDS]  # same size, other tokens
    with pytest.raises(FastloraError, match="the training data"):
        _trainer(tok, records=other).load_checkpoint(path)


# --- 1. the run folder, through the command --------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("reliability")
    tok.save(root / "tok.json")
    (root / "train.json").write_text(json.dumps(RECORDS))
    _gpt(tok).save(root / "base.safetensors")
    return root


def _train_args(files, out, *more):
    return ["train", "--data", str(files / "train.json"), "--out", str(out), "--model", str(files / "base.safetensors"),
            "--tokenizer", str(files / "tok.json"), "--batch-size", "8", "--epochs", "1", *more]


def test_a_rerun_into_a_finished_run_is_refused_unless_resumed_or_overwritten(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(files, out, "--max-steps", "2")) == 0
    finished = (out / "checkpoint.safetensors").read_bytes()
    capsys.readouterr()
    assert main(_train_args(files, out)) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run (checkpoint.safetensors" in err and "--resume" in err and "--overwrite" in err
    assert (out / "checkpoint.safetensors").read_bytes() == finished
    assert main(_train_args(files, out, "--resume", "--overwrite")) == 2
    assert main(_train_args(files, out, "--overwrite", "--max-steps", "1")) == 0
    assert json.loads((out / "checkpoint.safetensors.json").read_text())["step"] == 1


def test_resume_with_a_changed_lr_is_refused_unless_allowed(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(files, out, "--max-steps", "1", "--lr", "1e-3")) == 0
    capsys.readouterr()
    assert main(_train_args(files, out, "--resume", "--lr", "2e-3")) == 2
    assert "lr 0.002 (the checkpoint's run: 0.001)" in capsys.readouterr().err
    assert main(_train_args(files, out, "--resume", "--lr", "2e-3", "--allow-changes")) == 0


def test_an_unwritable_out_is_found_before_training(files, tmp_path, capsys, monkeypatch):
    import fastlora.cli as cli
    monkeypatch.setattr(cli, "_train", lambda args: pytest.fail("training started"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(_train_args(files, blocker / "out")) == 2  # a path under a file: even root cannot write
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{blocker / 'out'}: cannot write there" in err
    assert main(_train_args(files, blocker)) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_a_read_only_out_is_found_before_training(files, tmp_path, capsys, monkeypatch):
    import fastlora.cli as cli
    monkeypatch.setattr(cli, "_train", lambda args: pytest.fail("training started"))
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        try:
            (locked / "probe").write_text("x")
        except PermissionError:
            pass
        else:
            pytest.skip("this user (root) can write into a read-only folder; the path-under-a-file test covers it")
        assert main(_train_args(files, locked)) == 2
        assert "cannot write there" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_a_second_run_into_a_held_folder_is_refused(files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".fastlora.lock", os.O_RDWR | os.O_CREAT)  # another process's lock, as flock sees it
    try:
        os.write(fd, b"4242\n")
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert main(_train_args(files, out)) == 2
        assert "another fastlora run (pid 4242) is using this folder" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert main(_train_args(files, out, "--max-steps", "1")) == 0  # the lock went with its holder


_SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import fastlora.io as io
    real, calls = io.atomic_write, []

    def stalled(path, write_fn, mode="wb"):  # the 2nd checkpoint save stops half-way, a marker says so
        calls.append(path)
        if len(calls) == 3:
            def half(fh):
                fh.write(b"x" * 4096)
                fh.flush()
                open(sys.argv[1], "w").close()
                time.sleep(60)
            write_fn = half
        return real(path, write_fn, mode)

    io.atomic_write = stalled
    from fastlora.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_killed_during_a_save_then_a_concurrent_run_is_refused_and_resume_cleans_up(files, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "stalled"
    args = _train_args(files, out, "--save-every", "1")
    child = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(marker), *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.05)
        assert main(args) == 2  # the child holds the folder, mid-save
        assert f"(pid {child.pid}) is using this folder" in capsys.readouterr().err
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    stale = [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert stale  # the killed save left its temporary; the checkpoint it was replacing is whole
    before = json.loads((out / "checkpoint.safetensors.json").read_text())["step"]
    assert main(args + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert f"resumed from {out / 'checkpoint.safetensors'} at step {before}" in captured.out
    assert "removed 1 unfinished file(s)" in captured.err
    assert not [p for p in out.rglob(".tmp-*")]


# --- 2. bounded memory on hostile files -----------------------------------------------------------------

def _hostile(path, header, data_bytes=0, sparse_to=None):
    """A safetensors file with this header dict; data_bytes of zeros, or a hole up to sparse_to bytes."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw + bytes(data_bytes))
        if sparse_to is not None:
            fh.truncate(8 + len(raw) + sparse_to)
    return path


def _sparse_5gb(path, name="t", metadata=None):
    size = 5 * 10 ** 9
    header = {name: {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}
    if metadata:
        header["__metadata__"] = metadata
    _hostile(path, header, sparse_to=size)
    if os.stat(path).st_blocks * 512 > 2 ** 20:
        os.unlink(path)
        pytest.skip("this file system stores holes: a sparse test file would really take 5 GB")
    return path


def test_a_sparse_5gb_file_is_refused_before_reading_as_weights_adapter_and_checkpoint(tok, files, tmp_path, capsys):
    tracemalloc.start()
    try:
        sparse = r"claims 5,000,000,000 bytes of data but holds only .* \(a sparse file\)"
        with pytest.raises(FastloraError, match=sparse):
            load_safetensors(_sparse_5gb(tmp_path / "w.safetensors"))
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
        _sparse_5gb(adapter / "adapter_model.safetensors", "base_model.model.blocks.0.attn.q_proj.lora_A.weight")
        assert main(["eval", "--data", str(files / "train.json"), "--model", str(files / "base.safetensors"),
                     "--tokenizer", str(files / "tok.json"), "--adapter", str(adapter)]) == 2
        assert "(a sparse file)" in capsys.readouterr().err
        ckpt = _sparse_5gb(tmp_path / "c.safetensors", "model.embed.weight",
                           {"fastlora_checkpoint": json.dumps({"format": 1})})
        with pytest.raises(FastloraError, match=r"c.safetensors: parameter 'embed.weight' has shape \(1250000000,\)"):
            _trainer(tok).load_checkpoint(ckpt)
        assert tracemalloc.get_traced_memory()[1] < 50 * 2 ** 20
    finally:
        tracemalloc.stop()


def test_a_sparse_data_file_is_refused_before_reading(files, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    with open(data, "wb") as fh:
        fh.truncate(5 * 10 ** 9)
    if os.stat(data).st_blocks * 512 > 2 ** 20:
        pytest.skip("this file system stores holes")
    assert main(_train_args(files, tmp_path / "out")[:2] + [str(data)] + _train_args(files, tmp_path / "out")[3:]) == 2
    assert f"{data}: claims 5,000,000,000 bytes" in capsys.readouterr().err


def test_a_file_larger_than_the_memory_available_is_refused(tmp_path, monkeypatch):
    import fastlora.io as io
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"w": np.ones(1000, np.float32)})
    monkeypatch.setattr(io, "available_memory", lambda: 1000)
    with pytest.raises(FastloraError, match=rf"{path}: reading it needs .* GiB, more than the .* GiB of memory"):
        load_safetensors(path)


@pytest.mark.parametrize("header,data,match", [
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "lies outside the file"),
    ({"t": {"dtype": "F32", "shape": [2 ** 40], "data_offsets": [0, 16]}}, 16, "needs 4398046511104"),
    ({"t": {"dtype": "F32", "shape": [2 ** 62, 8], "data_offsets": [0, 16]}}, 16, "holds 16 bytes"),
    ({"t": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, 16, "unknown dtype 'Q9'"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 16, "two tensors overlap"),
    ({"t": {"dtype": "F32", "shape": "x", "data_offsets": [0, 16]}}, 16, "malformed header entry"),
])
def test_oversized_and_inconsistent_headers_are_refused_before_reading(tmp_path, header, data, match):
    path = _hostile(tmp_path / "h.safetensors", header, data)
    with pytest.raises(FastloraError, match=match) as err:
        load_safetensors(path)
    assert str(err.value).startswith(f"{path}: ")


def test_a_header_length_past_the_file_is_refused(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    with pytest.raises(FastloraError, match="header length 1000000000000 does not fit the 10-byte file"):
        load_safetensors(path)


def test_a_panic_in_the_safetensors_library_becomes_one_error(tmp_path, monkeypatch):
    import safetensors

    class PanicException(BaseException):  # pyo3's, as the library raises it
        pass

    def panic(*a, **k):
        raise PanicException("called `Result::unwrap()` on an `Err` value")

    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"w": np.ones(3, np.float32)})
    monkeypatch.setattr(safetensors, "safe_open", panic)
    with pytest.raises(FastloraError, match=r"m.safetensors: not a valid safetensors file .*unwrap"):
        load_safetensors(path)


def test_a_huge_vocab_size_in_a_sidecar_is_refused_before_allocating(files, tmp_path, capsys):
    weights = tmp_path / "m.safetensors"
    weights.write_bytes((files / "base.safetensors").read_bytes())
    cfg = json.loads((files / "base.safetensors.json").read_text())
    (tmp_path / "m.safetensors.json").write_text(json.dumps(dict(cfg, vocab_size=10 ** 7)))
    tracemalloc.start()
    try:
        assert main(["eval", "--data", str(files / "train.json"), "--model", str(weights),
                     "--tokenizer", str(files / "tok.json")]) == 2
        assert tracemalloc.get_traced_memory()[1] < 50 * 2 ** 20
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err
    assert f"{weights}.json: its sizes make embed.weight (10000000, 16)" in err


def test_deeply_nested_json_is_one_error_naming_the_file(files, tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FastloraError, match=f"{deep}: JSON nested too deeply"):
        read_json(deep)
    assert main(_train_args(files, tmp_path / "out")[:2] + [str(deep)] + _train_args(files, tmp_path / "out")[3:]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(deep) in err and "nested too deeply" in err


def test_chained_bpe_merges_take_memory_linear_in_the_chain(tmp_path):
    n = 20_000  # written out, the chain's texts would hold n * n / 2 = 200M characters
    special = len(BPETokenizer(["a", "b"], np.zeros((0, 2), np.int64)).special_tokens)
    a, b = special, special + 1
    merges = [[a, b]] + [[special + 2 + i, b] for i in range(n - 1)]
    path = tmp_path / "tok.json"
    BPETokenizer(["a", "b"], merges).save(path)
    tracemalloc.start()
    try:
        tok = BPETokenizer.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2 ** 20
    longest = "a" + "b" * n
    assert tok.id_to_token(tok.vocab_size - 1) == longest
    assert tok.decode([tok.vocab_size - 1, tok.vocab_size - 2]) == longest + longest[:-1]
    assert tok.encode(longest[:300]) == [special + 2 + 298]


def test_long_words_go_through_the_heap_encoder_and_match_the_reference():
    from fastlora.data import bpe_kernels as fast
    from fastlora.reference import bpe as slow
    rng = np.random.default_rng(0)
    lengths = [1, 2, 63, 64, 65, 66, 200, 700]  # the passes up to 64 symbols, the heap past it
    words = [rng.choice(3, size=n, p=[0.6, 0.3, 0.1]) for n in lengths]
    sym = np.concatenate(words).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    merges, _ = fast.train_merges(sym, offsets, np.ones(len(words), np.int64), 3, 200)
    assert len(merges) > 50
    for got, want in zip(fast.encode_words(sym, offsets, merges, 3), slow.encode_words(sym, offsets, merges, 3)):
        np.testing.assert_array_equal(got, want)


# --- 3. honest errors ------------------------------------------------------------------------------------

def test_a_bug_keeps_its_traceback_instead_of_exit_2(files, monkeypatch):
    import fastlora.cli as cli

    def buggy(*a, **k):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(cli, "_dataset", buggy)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["eval", "--data", str(files / "train.json"), "--model", str(files / "base.safetensors"),
              "--tokenizer", str(files / "tok.json")])


def test_a_nan_learning_rate_is_one_line_naming_the_flag(files, tmp_path, capsys):
    assert main(_train_args(files, tmp_path / "out", "--lr", "nan")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--lr" in err and "lr must be finite" in err
    assert not (tmp_path / "out" / "checkpoint.safetensors").exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN forward and each skipped step say so
def test_a_huge_learning_rate_stops_in_one_line_and_saves_nothing_non_finite(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_train_args(files, out, "--lr", "1e300", "--save-every", "1", "--epochs", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "training stopped at step" in err
    if (out / "checkpoint.safetensors").exists():
        assert f"the last good checkpoint is {out / 'checkpoint.safetensors'}" in err
        with safe_open(str(out / "checkpoint.safetensors"), framework="numpy") as f:
            assert all(np.isfinite(f.get_tensor(k)).all() for k in f.keys())
    else:
        assert "no checkpoint was written" in err


def test_a_bad_model_config_error_names_its_file(files, tmp_path, capsys):
    weights = tmp_path / "m.safetensors"
    weights.write_bytes((files / "base.safetensors").read_bytes())
    cfg = json.loads((files / "base.safetensors.json").read_text())
    (tmp_path / "m.safetensors.json").write_text(json.dumps(dict(cfg, num_heads=5)))
    assert main(["eval", "--data", str(files / "train.json"), "--model", str(weights),
                 "--tokenizer", str(files / "tok.json")]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: " in err and "num_heads=5" in err


def test_a_model_file_with_nan_weights_is_refused_naming_file_and_tensor(files, tmp_path, capsys):
    weights = tmp_path / "m.safetensors"
    state = load_safetensors(files / "base.safetensors")
    state["blocks.0.attn.q_proj.weight"][1, 2] = np.nan
    save_safetensors(weights, state)
    (tmp_path / "m.safetensors.json").write_text((files / "base.safetensors.json").read_text())
    assert main(["eval", "--data", str(files / "train.json"), "--model", str(weights),
                 "--tokenizer", str(files / "tok.json")]) == 2
    assert f"{weights}: blocks.0.attn.q_proj.weight holds NaN or infinite values" in capsys.readouterr().err

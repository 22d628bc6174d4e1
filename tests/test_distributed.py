"""Data-parallel training over MPI (issue 15): `mpiexec -n 2` runs of tests/mpi_worker.py against one process.

Tolerances. Two ranks compute the gradient of the same token-weighted loss as one process, but
add it up in another order (each rank sums its half of the batch, then the Allreduce adds the
halves; the matrix products run over other shapes). In float64 that leaves differences of a
few ulps, so there the losses, weights and AdamW buffers must agree to 1e-12: that checks the
algorithm (a mean of per-rank means would be off by ~1e-2, test_the_data_would_show_a_mean_of_means).
In float32 the same reordering changes a gradient element by ~1e-7 of the largest term summed,
and the losses (sums over hundreds of tokens) agree to rtol 1e-5. The weights get a looser
atol: AdamW moves each weight by lr * m / (sqrt(v) + 1e-8), nearly lr * sign(g) on the first
steps, so an element whose gradient is within rounding of zero can move by a different fraction
of lr; with lr 3e-3 over 6 steps the largest such difference measured is 1.4e-5 (QLoRA's lora_B
at zero init), and atol 1e-4 = lr / 30 leaves a margin of 7. The AdamW buffers are compared the
same way, relative to the largest value of each buffer kind. Between the ranks themselves the
weights and buffers must be bitwise equal.

Each job is bounded in time (subprocess timeout); the fault tests also bound how long the job
takes to stop.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastlora as fl
from fastlora.errors import FastloraError
from fastlora.train import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "mpi_worker.py")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
try:
    import mpi4py  # noqa: F401
    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False
needs_mpi = pytest.mark.skipif(not (HAVE_MPI4PY and MPIEXEC), reason="needs mpi4py and mpiexec: pip install "
                                                                    "'fastlora[mpi]'")
JOB_TIMEOUT_S = 180
FLOAT64 = dict(rtol=1e-12, atol=1e-12)
FLOAT32_LOSS = dict(rtol=1e-5, atol=0)
FLOAT32_WEIGHTS = dict(rtol=1e-4, atol=1e-4)


def mpiexec(args, n=2, timeout=JOB_TIMEOUT_S):
    """(completed process, seconds) of `mpiexec -n n` on `args` (a worker config, or a command line)."""
    command = [sys.executable, WORKER, json.dumps(args)] if isinstance(args, dict) else list(args)
    started = time.perf_counter()
    done = subprocess.run([MPIEXEC, "-n", str(n), *command], capture_output=True, text=True, timeout=timeout)
    return done, time.perf_counter() - started


def load(folder, rank=0):
    with np.load(os.path.join(folder, f"rank{rank}.npz")) as f:
        return {k: f[k] for k in f.files if k != "allreduce_seconds"}


def one_process(config):
    import mpi_worker
    mpi_worker.run(dict(config, distributed=False))
    return load(config["out"])


def assert_same_run(got, want, dtype):
    """Losses, trained weights and AdamW buffers (each buffer kind against its largest value) alike."""
    tol = FLOAT64 if dtype == "float64" else FLOAT32_WEIGHTS
    np.testing.assert_allclose(got["losses"], want["losses"], **(FLOAT64 if dtype == "float64" else FLOAT32_LOSS))
    assert sorted(got) == sorted(want)
    groups = {}
    for k in want:
        if k != "losses":
            groups.setdefault("param" if k.startswith("param/") else k.rsplit(".", 1)[-1], []).append(k)
    for group, keys in groups.items():
        scale = 1.0 if group == "param" else max(float(np.abs(want[k]).max()) for k in keys)
        for k in keys:
            np.testing.assert_allclose(got[k], want[k], rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=k)


@needs_mpi
@pytest.mark.parametrize("kind,dtype", [("full", "float64"), ("lora", "float64"), ("full", "float32"),
                                        ("lora", "float32"), ("qlora", "float32")])
def test_two_ranks_equal_one_process(tmp_path, kind, dtype):
    config = {"kind": kind, "dtype": dtype, "steps": 6, "grad_accum": 2, "batch_size": 8}
    done, _ = mpiexec(dict(config, out=str(tmp_path / "mpi")))
    assert done.returncode == 0, done.stderr
    ranks = [load(tmp_path / "mpi", r) for r in (0, 1)]
    for k in ranks[0]:  # parameters and optimizer state identical on every rank
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k], err_msg=k)
    assert_same_run(ranks[0], one_process(dict(config, out=str(tmp_path / "one"))), dtype)


def test_the_data_would_show_a_mean_of_means():
    """The first global batch's halves score different numbers of tokens, so averaging per-rank mean
    losses would differ from the token-weighted loss by far more than the float64 tolerance."""
    import mpi_worker
    trainer, model = mpi_worker.build({"dtype": "float64", "distributed": False})
    batch = trainer.loader.batch_indices(0)[0]
    collate = trainer.collator.collate
    sums, counts = [], []
    with fl.no_grad():
        for half in np.array_split(batch, 2):
            b = collate([trainer.dataset[int(i)] for i in half])
            n = int(np.count_nonzero(b["labels"][:, 1:] != -100))
            sums.append(float(fl.cross_entropy(model(b["input_ids"]), b["labels"]).data) * n)
            counts.append(n)
    assert counts[0] != counts[1]
    weighted, mean_of_means = sum(sums) / sum(counts), np.mean([s / c for s, c in zip(sums, counts)])
    assert abs(weighted - mean_of_means) > 1e6 * FLOAT64["rtol"] * weighted


@needs_mpi
def test_checkpoint_resumes_with_another_number_of_ranks(tmp_path):
    """3 steps on 2 ranks, then 3 more in one process; and 3 in one process, 3 more on 2 ranks: both
    equal 6 uninterrupted steps (float64, constant learning rate so a longer max_steps is the same run)."""
    base = {"kind": "lora", "dtype": "float64", "batch_size": 4, "grad_accum": 2}
    straight = one_process(dict(base, steps=6, out=str(tmp_path / "straight")))

    two_then_one = dict(base, checkpoint_dir=str(tmp_path / "run21"), out=str(tmp_path / "21"))
    done, _ = mpiexec(dict(two_then_one, steps=3))
    assert done.returncode == 0, done.stderr
    assert_same_run(one_process(dict(two_then_one, steps=6, resume=True)), straight, "float64")

    one_then_two = dict(base, checkpoint_dir=str(tmp_path / "run12"), out=str(tmp_path / "12"))
    one_process(dict(one_then_two, steps=3))
    done, _ = mpiexec(dict(one_then_two, steps=6, resume=True))
    assert done.returncode == 0, done.stderr
    assert_same_run(load(tmp_path / "12"), straight, "float64")


@needs_mpi
def test_with_dropout_a_resumed_run_continues_exactly(tmp_path):
    """Each rank draws its own dropout masks from a stream derived from the step's shared RNG state, and
    every rank moves on to one next state, which the checkpoint holds: 3 + 3 steps equal 6, bitwise."""
    base = {"kind": "lora", "dtype": "float64", "batch_size": 4, "dropout": 0.1}
    done, _ = mpiexec(dict(base, steps=6, out=str(tmp_path / "straight")))
    assert done.returncode == 0, done.stderr
    resumed = dict(base, checkpoint_dir=str(tmp_path / "run"), out=str(tmp_path / "resumed"))
    for config in (dict(resumed, steps=3), dict(resumed, steps=6, resume=True)):
        done, _ = mpiexec(config)
        assert done.returncode == 0, done.stderr
    straight, got = load(tmp_path / "straight"), load(tmp_path / "resumed")
    for k in straight:
        np.testing.assert_array_equal(got[k], straight[k], err_msg=k)
    without = one_process(dict(base, steps=6, dropout=0.0, out=str(tmp_path / "none")))
    assert not np.allclose(straight["losses"][1:], without["losses"][1:])  # dropout did act


def test_ranks_draw_different_dropout_streams():
    from fastlora.train.shards import derived_rng_state
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    streams = [derived_rng_state(rng, state, label) for label in ("rank 0", "rank 1", "next step")]
    draws = []
    for s in streams:
        rng.bit_generator.state = s
        draws.append(rng.random(4))
    assert not np.allclose(draws[0], draws[1]) and not np.allclose(draws[0], draws[2])
    assert derived_rng_state(rng, state, "rank 1") == streams[1]  # a function of the state and label alone


@needs_mpi
def test_a_killed_rank_stops_the_job_and_the_checkpoint_survives(tmp_path):
    run = tmp_path / "run"
    config = {"kind": "lora", "steps": 12, "batch_size": 4, "checkpoint_dir": str(run), "save_every": 2,
              "fault": {"rank": 1, "step": 5, "how": "kill"}, "out": str(tmp_path / "out")}
    done, seconds = mpiexec(config, timeout=60)
    assert done.returncode != 0
    assert seconds < 30, f"the job took {seconds:.0f} s to stop"
    from fastlora.train.checkpoint import read_checkpoint
    _, _, state = read_checkpoint(run / "checkpoint.safetensors")
    assert state["step"] in (2, 4)  # the save due at 4 is written during step 5, if rank 1 got that far
    import mpi_worker  # the checkpoint resumes: in one process, to the end
    trainer, _ = mpi_worker.build(dict(config, distributed=False))
    trainer.load_checkpoint(run / "checkpoint.safetensors")
    assert len(trainer.train()) == 12


@needs_mpi
def test_a_rank_that_raises_stops_the_job_naming_rank_and_cause(tmp_path):
    config = {"kind": "lora", "steps": 12, "batch_size": 4, "fault": {"rank": 1, "step": 2, "how": "raise"},
              "out": str(tmp_path / "out")}
    done, seconds = mpiexec(config, timeout=60)
    assert done.returncode == distributed.EXIT_BUG, done.stderr
    assert seconds < 30
    assert "rank 1 of 2" in done.stderr and "RuntimeError: injected fault at step 2" in done.stderr


@needs_mpi
@pytest.mark.parametrize("differ,named", [("seed", "rank 1: arguments"), ("data", "rank 1: training data")])
def test_ranks_started_unlike_are_refused(tmp_path, differ, named):
    done, _ = mpiexec({"kind": "lora", "steps": 2, "differ": differ, "out": str(tmp_path)}, timeout=60)
    assert done.returncode == distributed.EXIT_BAD_INPUT, done.stderr
    assert named in done.stderr and "not started alike" in done.stderr
    assert done.stderr.count("not started alike") == 1  # rank 0 reports it, once


@needs_mpi
def test_the_command_under_mpiexec(tmp_path):
    """`mpiexec -n 2 fastlora train`: rank 0 alone prints and writes the adapter; a batch that does not
    split over the ranks is refused naming both numbers, with the command's exit status."""
    from fastlora.tasks import make_examples
    data = tmp_path / "data.json"
    data.write_text(json.dumps(make_examples(16, seed=0)))
    command = [sys.executable, "-m", "fastlora", "train", "--data", str(data), "--lora-rank", "4",
               "--max-steps", "2"]
    done, _ = mpiexec(command + ["--out", str(tmp_path / "run"), "--batch-size", "4"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("adapter written to") == 1
    assert "data-parallel over 2 MPI ranks" in done.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    done, _ = mpiexec(command + ["--out", str(tmp_path / "odd"), "--batch-size", "5"], timeout=60)
    assert done.returncode == distributed.EXIT_BAD_INPUT
    assert "batch_size 5 does not split over 2 ranks" in done.stderr


# --- without MPI ---------------------------------------------------------------------------------------

def test_mpi4py_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails
    monkeypatch.setattr(distributed, "_world", None)
    for name in distributed.SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(FastloraError, match=r"asked to train over MPI.*pip install 'fastlora\[mpi\]'"):
        distributed.attach(True)
    monkeypatch.setenv("PMI_SIZE", "4")
    with pytest.raises(FastloraError, match=r"one of 4 MPI ranks.*pip install 'fastlora\[mpi\]'"):
        distributed.attach(None)
    assert isinstance(distributed.attach(False), distributed.Local)  # told to train alone


def test_shards_are_disjoint_parts_of_each_global_batch():
    from fastlora.data import DataLoader
    data = [{"input_ids": [i + 1, i + 2], "labels": [i + 1, i + 2]} for i in range(11)]
    loader = DataLoader(data, batch_size=4, seed=3)
    shards = [distributed.ShardedLoader(loader, r, 2) for r in (0, 1)]
    for epoch in (0, 1):
        for whole, *parts in zip(loader.batch_indices(epoch), *(s.batch_indices(epoch) for s in shards)):
            assert np.array_equal(np.concatenate(parts), whole)  # disjoint, in order, all of it
        assert [len(list(s.iter_epoch(epoch, 1))) for s in shards] == [len(loader) - 1] * 2
    shards4 = [distributed.ShardedLoader(loader, r, 4) for r in range(4)]
    last = [list(s.iter_epoch(0, 2))[0] for s in shards4]  # 3 examples over 4 ranks: one rank gets none
    assert sorted(b["input_ids"].shape[0] for b in last) == [0, 1, 1, 1]
    with pytest.raises(FastloraError, match="batch_size 4 does not split over 3 ranks"):
        distributed.ShardedLoader(loader, 0, 3)


def test_gradient_buckets_are_views_and_keep_an_unreached_parameter_none():
    a, b, c = (fl.Tensor(np.zeros(s, np.float32), requires_grad=True) for s in ((3, 5), (7,), (2, 2)))
    d = fl.Tensor(np.zeros(4, np.float64), requires_grad=True)
    buckets = distributed.GradBuckets([a, b, c, d, a], bucket_bytes=16)
    assert len(buckets.params) == 4 and len(buckets.flats) == 2
    assert sum(x.size for x in buckets.buckets) == 3 * 5 + 7 + 4 + 4
    buckets.attach()
    a.grad, b.grad, d.grad = np.ones((3, 5), np.float32), np.full(7, 2, np.float32), np.ones(4)  # c: no gradient
    flags = buckets.gather()
    assert flags.tolist() == [1, 1, 0, 1]
    buckets.scatter(flags)
    assert c.grad is None and a.grad.base is buckets.flats[0] and d.grad.base is buckets.flats[1]
    buckets.attach()  # next step: the backward accumulates into the views in place
    assert a.grad.base is buckets.flats[0] and not a.grad.any() and c.grad is None


@needs_mpi
def test_ctrl_c_stops_every_rank_at_one_step_and_the_run_resumes_exactly(tmp_path):
    """mpiexec passes Ctrl-C to every rank; they stop at the same step boundary, rank 0 saves, and the
    run resumed from there equals the uninterrupted one."""
    config = {"kind": "lora", "dtype": "float64", "steps": 400, "batch_size": 4, "save_every": 2,
              "checkpoint_dir": str(tmp_path / "run"), "out": str(tmp_path / "out")}
    job = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, WORKER, json.dumps(config)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "run" / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        job.send_signal(signal.SIGINT)
        _, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == 130, stderr
    from fastlora.train.checkpoint import read_checkpoint
    _, _, state = read_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    stopped = state["step"]
    assert 2 <= stopped < 400, stderr
    assert f"interrupted at step {stopped}" in stderr
    steps = min(stopped + 3, 400)
    done, _ = mpiexec(dict(config, steps=steps, resume=True))
    assert done.returncode == 0, done.stderr
    assert_same_run(load(tmp_path / "out"), one_process(dict(config, steps=steps, checkpoint_dir=None,
                                                             out=str(tmp_path / "one"))), "float64")


def test_the_readme_commands_parse():
    """The `mpiexec ... fastlora train` lines of the README's "More than one machine" are valid commands."""
    import re
    import shlex

    from fastlora.cli import build_parser
    readme = open(os.path.join(HERE, "..", "README.md"), encoding="utf-8").read()
    section = readme.split("## More than one machine", 1)[1].split("\n## ", 1)[0]
    lines = [shlex.split(line, comments=True) for block in re.findall(r"```bash\n(.*?)```", section, re.S)
             for line in block.splitlines()]
    launched = [words for words in lines if words[:1] == ["mpiexec"]]
    assert launched
    for words in launched:
        args = build_parser().parse_args(words[words.index("fastlora") + 1:])
        assert args.command == "train" and args.batch_size % int(words[words.index("-n") + 1]) == 0

"""Data-parallel training over MPI (mpi4py): N processes, each on its part of every global batch.

Under `mpiexec -n N` the Trainer trains data-parallel; with one process every hook below is a
no-op (`Local`). The Trainer calls it at a few points:

    shard(loader)             rank r reads the r-th of N disjoint parts of each global batch of
                              `batch_size` examples. The batches come from (seed, epoch) alone, so the
                              data order, the step boundaries and the checkpointed position are one
                              process's: a checkpoint written with N ranks resumes with M.
    global_count(n)           the scored tokens of the whole global batch (one small Allreduce that
                              also carries a Ctrl-C any rank has seen)
    attach_grads(params)      before the backward: every .grad is a view of one flat buffer per dtype
    allreduce_grads(...)      after it: Allreduce(IN_PLACE, SUM) over those buffers, a bucket at a time.
                              Each rank weighted its micro-batch losses count / global count, so the
                              sum is the gradient one process gets on the whole global batch (not a
                              mean of per-rank means), and clipping and AdamW then run on identical
                              numbers on every rank: parameters and optimizer state stay identical.
    running(trainer)          around train(): the ranks compare checksums of their arguments, data and
                              weights first; Ctrl-C stops every rank at the same step boundary; a rank
                              that raises ends the job (guard)
    is_main                   rank 0 alone prints progress and writes checkpoints and adapters

ShardedLoader and GradBuckets live in fastlora.train.shards (they need no MPI). Dropout: during a
step each rank draws from its own stream, seeded from the step's starting RNG state and its rank,
and after it every rank moves on to one next state; so ranks never repeat each other's masks, every
rank holds the state a checkpoint stores, and a resumed run with dropout continues exactly (with
dropout, N ranks cannot draw one process's masks: such a run equals itself, not a single process).

Faults: an exception escaping guard() on any rank prints one line naming the rank and the cause
and calls MPI_Abort, which ends every rank (mpiexec exits with the code: 2 for bad input, as the
command does). A rank that dies outright (SIGKILL, out of memory) is seen by mpiexec, which ends
the others. Either way no rank waits forever in a collective the failed one will never join, and
checkpoints, written atomically by rank 0, stay whole. An exception nobody catches in a script run
under mpiexec ends the job the same way (sys.excepthook, as `python -m mpi4py` does).

The gradient is not reduced while the backward runs: with every core busy in the kernels and
MPICH progressing a non-blocking collective only inside MPI calls, overlap could save at most the
allreduce's share of the step, which bench/README.md measures.
"""
import contextlib
import faulthandler
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback

import numpy as np

from fastlora.errors import FastloraError
from fastlora.train.checkpoint import rng_generators, rng_states
from fastlora.train.shards import GradBuckets, ShardedLoader, derived_rng_state

# the variables launchers set to the number of ranks: MPICH / Intel MPI (hydra) and Slurm's PMI,
# Open MPI, MVAPICH
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# a rank other than 0 that raises a FastloraError waits this long before it aborts, so an error every
# rank hits alike (a bad flag, a diverged run) is reported once, by rank 0
_REPORT_GRACE_S = 1.0
_FORWARD_GRACE_S = 0.25  # between a rank's last words on stderr and its MPI_Abort (see _abort)
EXIT_BAD_INPUT, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130
MPI_EXTRA = "pip install 'fastlora[mpi]'"

_world = None


class AgreedInterrupt(KeyboardInterrupt):
    """A Ctrl-C every rank raises at the same step boundary (one of them saw it)."""


def launched_size():
    """The number of ranks a launcher started this process among (1 when none did)."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def world(required=False):
    """The Group of this job's ranks when there is more than one, else None. MPI is started (mpi4py
    imported) only under a launcher of several ranks, or when `required` (fastlora train --mpi,
    Trainer(distributed=True)); a FastloraError naming the extra when mpi4py is missing then."""
    global _world
    size = launched_size()
    if _world is None and (required or size > 1):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            how = f"started as one of {size} MPI ranks" if size > 1 else "asked to train over MPI"
            raise FastloraError(f"{how}, but mpi4py cannot be imported ({exc}); install the MPI extra on "
                                f"every host: {MPI_EXTRA}") from None
        _world = Group(MPI.COMM_WORLD, MPI)
    return _world if _world is not None and _world.size > 1 else None


def is_main():
    """True in rank 0 of an MPI job, and in a process that is not one: where a script prints and saves."""
    group = world()
    return group is None or group.is_main


def attach(distributed=None):
    """What a Trainer uses: Local() for one process, else the Group. `distributed`: None to follow the
    launcher, True to require MPI, False to train alone even under mpiexec."""
    if distributed is False:
        return Local()
    return world(required=bool(distributed)) or Local()


def exit_code(exc):
    """The exit status a rank failing with `exc` ends the job with (the command's own codes)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) and exc.code else EXIT_BUG
    return EXIT_BAD_INPUT if isinstance(exc, (FastloraError, OSError)) else EXIT_BUG


@contextlib.contextmanager
def guard(group):
    """Under MPI (`group` not None), an exception escaping the block ends the whole job: one line on
    stderr naming the rank and the cause (with the traceback for a bug), then MPI_Abort. An
    AgreedInterrupt passes through: every rank raises it together and may exit normally."""
    if group is None or group.size == 1:
        yield
        return
    try:
        yield
    except AgreedInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - anything at all must end the job, not hang it
        group.abort(exc)


class Local:
    """One process: every hook does nothing."""

    rank, size, is_main = 0, 1, True

    def shard(self, loader):
        return loader

    def global_count(self, count):
        return count

    def attach_grads(self, params):
        pass

    def allreduce_grads(self, params, loss_sum, tokens):
        return loss_sum, tokens

    def running(self, trainer):
        return contextlib.nullcontext()


class Group(Local):
    """The ranks of one MPI job (COMM_WORLD) and what data-parallel training does with them."""

    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_main = self.rank == 0
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size, local_rank = node.Get_size(), node.Get_rank()
        node.Free()
        counts = np.array([int(local_rank == 0)], dtype=np.int64)
        comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
        self.hosts = int(counts[0])
        self.pids = np.empty(self.size, dtype=np.int64)
        comm.Allgather(np.array([os.getpid()], dtype=np.int64), self.pids)
        self.threads = _share_cores(self.local_size)
        self.host = socket.gethostname()
        self.allreduce_seconds = 0.0  # time spent in the gradient Allreduce (waits for slower ranks included)
        self._buckets = None
        self._interrupted = False
        self._generators, self._step_states = [], []
        _abort_on_uncaught(self)
        faulthandler.enable()  # a rank that crashes in native code prints where, before mpiexec names its pid

    # --- faults ----------------------------------------------------------------------------------------
    def abort(self, exc):
        """Report `exc` as this rank's cause and end every rank (MPI_Abort); never returns."""
        if isinstance(exc, FastloraError) and not self.is_main:
            time.sleep(_REPORT_GRACE_S)  # rank 0 reports (and aborts on) an error every rank hit alike
        cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if exit_code(exc) == EXIT_BUG and not isinstance(exc, SystemExit):
            cause = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
        print(f"fastlora: rank {self.rank} of {self.size} (pid {os.getpid()} on {self.host}) stops the job: {cause}",
              file=sys.stderr, flush=True)
        _abort(self.comm, exit_code(exc))

    # --- the data ----------------------------------------------------------------------------------------
    def shard(self, loader):
        return ShardedLoader(loader, self.rank, self.size)

    # --- one step ------------------------------------------------------------------------------------------
    def global_count(self, count):
        total = self._count_and_agree(count)
        self._rngs_for_rank()
        return total

    def _count_and_agree(self, count):
        buf = np.array([count, int(self._interrupted)], dtype=np.int64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        if buf[1]:
            self._interrupted = False
            raise AgreedInterrupt()
        return int(buf[0])

    def _rngs_for_rank(self):
        """Each rank draws this step's dropout masks from its own stream, derived from the step's start
        state (the same on every rank) and its rank; _rngs_joined moves every rank on to one next state.
        So ranks do not repeat each other's masks, and the states a checkpoint holds are every rank's."""
        self._step_states = [(rng, rng.bit_generator.state) for rng in self._generators]
        for rng, state in self._step_states:
            rng.bit_generator.state = derived_rng_state(rng, state, f"rank {self.rank}")

    def _rngs_joined(self):
        for rng, state in self._step_states:
            rng.bit_generator.state = derived_rng_state(rng, state, "next step")
        self._step_states = []

    def attach_grads(self, params):
        if self._buckets is None or not self._buckets.holds(params):
            self._buckets = GradBuckets(params)
        self._buckets.attach()

    def allreduce_grads(self, params, loss_sum, tokens):
        buckets = self._buckets
        stats = np.concatenate(([loss_sum, tokens], buckets.gather()))
        started = time.perf_counter()
        for bucket in buckets.buckets:
            self.comm.Allreduce(self.MPI.IN_PLACE, bucket, op=self.MPI.SUM)
        self.comm.Allreduce(self.MPI.IN_PLACE, stats, op=self.MPI.SUM)
        self.allreduce_seconds += time.perf_counter() - started
        buckets.scatter(stats[2:])
        self._rngs_joined()
        return float(stats[0]), int(stats[1])

    # --- the run -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self, trainer):
        with guard(self), self._ctrl_c_deferred():
            self.check_alike(trainer)
            self._generators = list({id(g): g for _, g in rng_generators(trainer.model)}.values())
            if self.is_main:
                print(f"fastlora: data-parallel over {self.size} MPI ranks on {self.hosts} host(s), "
                      f"{self.threads} thread(s) each; each global batch of {trainer.batch_size} is split "
                      f"{trainer.batch_size // self.size} per rank; rank pids "
                      f"{', '.join(f'{r}={p}' for r, p in enumerate(self.pids))}", file=sys.stderr, flush=True)
            try:
                yield
            except AgreedInterrupt:
                self.comm.Barrier()  # nobody leaves (and perhaps aborts) before rank 0 has saved the run
                raise
            self._count_and_agree(0)  # a Ctrl-C seen after the last step stops every rank here, together

    @contextlib.contextmanager
    def _ctrl_c_deferred(self):
        """A Ctrl-C (mpiexec passes it to every rank) only sets a flag; global_count turns it into an
        AgreedInterrupt on every rank at the next step boundary. Raised where each rank happened to
        be, it would leave the others waiting in a collective."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, lambda signum, frame: setattr(self, "_interrupted", True))
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def check_alike(self, trainer):
        """FastloraError on every rank when some rank was started with other arguments, data or weights
        than rank 0: SHA-256 checksums of each, compared across the ranks."""
        mine = np.frombuffer(b"".join(run_digests(trainer)), dtype=np.uint8)
        table = np.empty((self.size, mine.size), dtype=np.uint8)
        self.comm.Allgather(mine, table)
        table = table.reshape(self.size, len(DIGESTS), -1)
        differ = [f"rank {r}: {', '.join(name for k, name in enumerate(DIGESTS) if (table[r, k] != table[0, k]).any())}"
                  for r in range(1, self.size) if (table[r] != table[0]).any()]
        if differ:
            raise RankMismatch(f"the ranks were not started alike; these differ from rank 0's ({'; '.join(differ)}), "
                               "by checksums compared at the start. Start every rank with the same command, data "
                               "and model files (and the same seed)")


class RankMismatch(FastloraError):
    """Ranks started with different arguments, data or weights."""


# --- checks and threads ---------------------------------------------------------------------------------

DIGESTS = ("arguments", "training data", "weights, optimizer and RNG state")


def run_digests(trainer):
    """SHA-256 digests (32 bytes each, in DIGESTS order) of a trainer's arguments, data and weights."""
    from fastlora.optim import split_state
    from fastlora.train.resume import hyper_parameters
    model = trainer.model
    arguments = {
        "trainer": [trainer.batch_size, trainer.epochs, trainer.grad_accum_steps, trainer.total_steps, trainer.seed,
                    trainer.max_grad_norm, trainer.max_bad_steps, trainer.save_every, trainer.eval_every,
                    None if trainer.checkpoint_dir is None else os.fspath(trainer.checkpoint_dir)],
        "position": [trainer.step, trainer.epoch, trainer.batch_in_epoch],
        "optimizer": [type(trainer.optimizer).__name__, hyper_parameters(trainer.optimizer),
                      [g["lr"] for g in trainer.optimizer.param_groups]],
        "schedule": [trainer.schedule.warmup_steps, trainer.schedule.total_steps, trainer.schedule.min_lr_ratio],
        "model": [type(model).__name__] + [[name, list(p.shape), str(p.data.dtype), bool(p.requires_grad)]
                                           for name, p in model.named_parameters()],
    }
    data = [trainer.data_fingerprint()]
    if trainer.eval_dataset is not None:
        from fastlora.train.checkpoint import data_fingerprint
        data.append(data_fingerprint(trainer.eval_dataset))
    weights = hashlib.sha256()
    meta, buffers = split_state(trainer.optimizer.state_dict())
    for arrays in (model.state_dict(), buffers):
        for name, array in arrays.items():
            weights.update(name.encode() + b"|" + np.ascontiguousarray(array).tobytes())
    weights.update(json.dumps([meta, rng_states(model)], sort_keys=True, default=str).encode())
    return [hashlib.sha256(json.dumps(arguments, sort_keys=True, default=str).encode()).digest(),
            hashlib.sha256("|".join(data).encode()).digest(), weights.digest()]


def _share_cores(local_ranks):
    """Threads per rank: OMP_NUM_THREADS or a fastlora.set_num_threads(n) other than the default when
    given, else the host's cores shared out among its ranks (every rank using every core would run
    cores x ranks threads)."""
    from fastlora._runtime import process as _process
    from fastlora._runtime import threads as _threads
    cores = os.cpu_count() or 1
    if "OMP_NUM_THREADS" in os.environ or _threads.get_num_threads() != cores:
        return _threads.get_num_threads()
    threads = max(1, cores // local_ranks)
    _process.set_num_threads(threads)
    return threads


def _abort_on_uncaught(group):
    """An exception no one catches ends the job (after the usual traceback) instead of leaving the other
    ranks waiting for this one."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        sys.stderr.flush()
        _abort(group.comm, exit_code(value) if isinstance(value, BaseException) else EXIT_BUG)

    sys.excepthook = hook


def _abort(comm, code):
    """MPI_Abort, and should it come back (MPICH's can, while its launcher is already ending the job),
    leave without running another line of Python. First a moment for the launcher to pass on what
    this rank just wrote to stderr: the abort may reach it before the pipe's last lines do, and the
    one line that says why the job stopped was then lost (seen once in a CI run)."""
    time.sleep(_FORWARD_GRACE_S)
    comm.Abort(code)
    os._exit(code)

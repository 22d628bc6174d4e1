"""The output folder of a training run: checked writable up front, held by one run at a time, kept clean.

    hold(folder)          a lock (flock on <folder>/.fastlora.lock) for as long as the block runs;
                          another process holding it is refused with its pid; reentrant in one
                          process, and released by the kernel if the process dies (no stale locks)
    check_writable(...)   the folder exists or can be made, and a file can be written in it (and in
                          the sub-folders the run will write), before any training is done
    existing_run(folder)  the files of an earlier run found there (a checkpoint, a model, an adapter)
    clean(folder)         removes what killed saves left (atomic_write's .tmp-* files)
    prepare(folder, ...)  what `fastlora train` does holding the lock: refuse an earlier run unless
                          resuming or overwriting it, then clean

The lock file stays in the folder: deleting it while another process waits on it would let two
runs in. Without fcntl (Windows) runs are not locked.
"""
import contextlib
import os
import tempfile

from fastlora.errors import RunFolderError
from fastlora.io import TMP_PREFIX, remove_stale_temporaries

CHECKPOINT_NAME = "checkpoint.safetensors"

LOCK_NAME = ".fastlora.lock"
# what a run leaves: the trainer's checkpoint and the command's outputs
RUN_FILES = (CHECKPOINT_NAME, CHECKPOINT_NAME + ".json", "model.safetensors",
             os.path.join("adapter", "adapter_config.json"), os.path.join("model", "config.json"))
_held = {}  # real path of a held folder -> [lock file descriptor, depth]


def check_writable(folder, subfolders=()):
    """Make `folder` (and `subfolders` of it) if missing and write a scratch file in each; a
    RunFolderError naming the folder when that fails (a path under a file, no permission, a
    read-only file system)."""
    folder = os.fspath(folder)
    for target in [folder] + [os.path.join(folder, s) for s in subfolders]:
        if os.path.exists(target) and not os.path.isdir(target):
            raise RunFolderError(f"{target}: exists and is not a folder; the run writes a folder there")
        try:
            os.makedirs(target, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-write-check", dir=target)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise RunFolderError(f"{target}: cannot write there ({exc.strerror or exc}); choose another "
                                 "output folder") from None


def existing_run(folder):
    """The paths of an earlier run's files in `folder` (empty when it holds none)."""
    return [os.path.join(folder, name) for name in RUN_FILES if os.path.exists(os.path.join(folder, name))]


def clean(folder):
    """Remove the temporaries killed saves left in `folder` and its sub-folders; returns them.
    Only while holding the folder's lock: a live run's temporaries look the same."""
    folder = os.fspath(folder)
    removed = remove_stale_temporaries(folder)
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False):
                removed += remove_stale_temporaries(entry.path)
    return removed


def prepare(folder, resume=False, overwrite=False):
    """Ready a held `folder` for a run: an earlier run there is refused unless `resume` (continue
    it) or `overwrite` (its checkpoint is deleted now, so a crash before the first new save
    cannot leave it to be resumed by mistake); then clean(). Returns the temporaries removed."""
    if resume and overwrite:
        raise RunFolderError(f"{folder}: resuming continues the run there and overwriting replaces it; "
                             "choose one (--resume or --overwrite)")
    earlier = existing_run(folder)
    if earlier and not (resume or overwrite):
        found = ", ".join(os.path.relpath(p, folder) for p in earlier)
        raise RunFolderError(f"{folder}: holds an earlier run ({found}); pass --resume to continue it or "
                             "--overwrite to replace it")
    if overwrite:
        for name in (CHECKPOINT_NAME, CHECKPOINT_NAME + ".json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))
    return clean(folder)


@contextlib.contextmanager
def hold(folder):
    """Hold `folder`'s lock for the block (see the module docstring); the folder is checked
    writable (and made) first."""
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    check_writable(folder)
    try:
        import fcntl
    except ImportError:  # no flock: run unlocked
        yield
        return
    path = os.path.join(folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderError(f"{folder}: another fastlora run (pid {holder}) is using this folder; wait for it "
                             "to finish or choose another output folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            del _held[key]
            os.close(fd)  # releases the lock

"""fastlora leaves the caller's process as it found it (issue 18): no malloc tuning or
environment variable at import, malloc tuned only inside fastlora.runtime() (so Trainer.train)
and set back after, and NumPy's BLAS thread count as the caller left it after any call.
Each check runs in a fresh interpreter: these are process-wide settings."""
import json
import subprocess
import sys
import textwrap

import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")


def run(code):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


MALLINFO = """
import ctypes, os, numpy as np
class _Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = _Info
def mmapped_for_24mib():
    # 1 when a fresh 24 MiB NumPy buffer gets its own mmap (glibc's default), 0 when it comes
    # from the heap (fastlora's tuning)
    before = libc.mallinfo2().hblks
    a = np.ones(24 << 20, dtype=np.uint8)
    n = libc.mallinfo2().hblks - before
    del a
    return n
"""


def _glibc():
    import ctypes
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


def test_import_writes_no_environment_variable():
    got = run("""
        import json, os
        before = dict(os.environ)
        import fastlora, fastlora.kernels
        from fastlora._ext import gemm, attention
        print(json.dumps({"same": dict(os.environ) == before,
                          "omp": [k for k in os.environ if k.startswith(("OMP_", "GOMP_"))]}))
    """)
    assert got == {"same": True, "omp": []}


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc's malloc")
def test_malloc_tuned_only_inside_runtime():
    got = run(MALLINFO + """
import json
import fastlora as fl
after_import = mmapped_for_24mib()
with fl.runtime():
    with fl.runtime():  # nested: the outer block's end sets the defaults back
        pass
    inside = mmapped_for_24mib()
after = mmapped_for_24mib()
print(json.dumps([after_import, inside, after]))
""")
    assert got == [1, 0, 1]


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc's malloc")
def test_trainer_train_tunes_malloc_then_sets_it_back():
    got = run(MALLINFO + """
import json
import numpy as np
import fastlora as fl
from fastlora._runtime import malloc as _malloc
from fastlora.optim import SGD
from fastlora.train import Trainer
seen = []
model = fl.GPT(vocab_size=20, embed_dim=16, num_heads=2, num_layers=1, max_seq_len=16)
orig = _malloc.keep_heap
def probe():
    ok = orig()
    seen.append(mmapped_for_24mib())
    return ok
_malloc.keep_heap = probe
ids = np.random.default_rng(0).integers(0, 20, (4, 16)).tolist()
data = [{"input_ids": r, "labels": r} for r in ids]
Trainer(model, SGD(model.parameters(), lr=0.01), data, batch_size=2, max_steps=2, progress=False).train()
print(json.dumps([seen, mmapped_for_24mib()]))
""")
    assert got == [[0], 1]  # tuned once, inside train(); the default again after


BLAS = """
import json
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
def blas():
    return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
threadpool_limits(3, "blas")
import fastlora as fl
from fastlora._runtime import blas as _blas
got = {}
"""


def test_blas_threads_as_the_caller_left_them():
    got = run(BLAS + """
if _blas.gemm_pointers() is None and _blas._getter() is None:
    print(json.dumps("no openblas")); raise SystemExit
rng = np.random.default_rng(0)
ids = rng.integers(0, 50, (4, 64))
model = fl.GPT(vocab_size=50, embed_dim=64, num_heads=4, num_layers=2, max_seq_len=64)
model(ids); got["forward"] = blas()
loss = model.loss(ids, ids); got["loss"] = blas()
loss.backward(); got["backward"] = blas()
a = fl.Tensor(rng.random((256, 256), dtype=np.float32), requires_grad=True)
b = a @ a; got["op"] = blas()
b.sum().backward(); got["op backward"] = blas()
with fl.no_grad():
    model(ids)
got["no_grad forward"] = blas()
fl.cross_entropy(model(ids), ids).backward(); got["cross_entropy"] = blas()
q = rng.random((2, 64, 128), dtype=np.float32)
fl.kernels.causal_attention_forward(q, q, q, 4); got["attention kernel"] = blas()
h = rng.random((2, 128, 128), dtype=np.float32)
w = rng.random((500, 128), dtype=np.float32)
fl.kernels.linear_cross_entropy_forward(h, w, rng.integers(0, 500, (2, 128))); got["linear_ce kernel"] = blas()
lora = fl.LoRAModel(model, target_modules=["q_proj", "v_proj"], rank=4, alpha=8)
lora.inject_lora()
lora.loss(ids, ids).backward() if hasattr(lora, "loss") else fl.cross_entropy(lora(ids), ids).backward()
got["lora"] = blas()
threadpool_limits(1, "blas")
model(ids); got["caller's 1"] = blas()
print(json.dumps(got))
""")
    if got == "no openblas":
        pytest.skip("NumPy's BLAS is not an OpenBLAS fastlora switches")
    want = {k: [3] for k in got}
    want["caller's 1"] = [1]
    assert got == want


def test_effective_threads_follow_an_explicit_count():
    got = run("""
import json
import fastlora as fl
from fastlora._runtime import threads as _threads
fl.set_num_threads(2)
print(json.dumps(_threads.effective_threads()))
""")
    assert got == 2


def test_a_spin_setting_the_user_made_stays():
    got = run("""
        import json, os
        os.environ["GOMP_SPINCOUNT"] = "123"
        import fastlora
        from fastlora._ext import gemm
        print(json.dumps(os.environ.get("GOMP_SPINCOUNT")))
    """)
    assert got == "123"


def test_default_threads_shrink_to_the_free_cores(monkeypatch):
    from fastlora._runtime import threads as _threads
    monkeypatch.setattr(_threads, "_num_threads", 2)
    monkeypatch.setattr(_threads, "_explicit", False)
    monkeypatch.setattr(_threads, "_cap", None)
    monkeypatch.setattr(_threads, "_next_sample", 0.0)
    monkeypatch.setattr(_threads, "_others", _threads.collections.deque(maxlen=_threads._SAMPLES))
    monkeypatch.setattr(_threads.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(_threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(_threads, "_running_elsewhere", lambda: 2)  # a twin's two threads
    assert _threads.effective_threads() == 1
    assert _threads.threads_for(1 << 20) == 1
    monkeypatch.setattr(_threads, "_running_elsewhere", lambda: 0)  # the twin is gone
    for _ in range(_threads._SAMPLES):
        _threads._next_sample = 0.0
        n = _threads.effective_threads()
    assert n == 2
    monkeypatch.setattr(_threads, "_explicit", True)  # set_num_threads(2): as asked, whatever the load
    monkeypatch.setattr(_threads, "_running_elsewhere", lambda: 5)
    _threads._next_sample = 0.0
    assert _threads.effective_threads() == 2

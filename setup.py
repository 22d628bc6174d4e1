"""Build the Cython kernels in csrc/ as fastlora._ext.<name> extension modules.

Environment switches (all optional):
  FASTLORA_NATIVE=1        add -march=native (faster, but the build only runs on this CPU)
  FASTLORA_NO_OPENMP=1     build without OpenMP even when the compiler supports it
  FASTLORA_DEBUG=1         turn Cython bounds/wraparound checks back on and keep debug info (-g)
  FASTLORA_KERNELS=a,b     (development) build only csrc/a.pyx and csrc/b.pyx

Release builds carry no debug info (-g0), and Cython's memoryview types and helpers are compiled
once, into fastlora._ext._cyutility, instead of into every kernel module (Cython >= 3.1).
`pip install -v .` shows each step as it runs.
"""
import glob
import os
import platform
import subprocess
import sys
import tempfile

import Cython
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


OPENMP_PROBE = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
PLAIN_PROBE = "int main(void){return 0;}\n"
SIMD_FLAGS = ["-mavx2", "-mfma"]


def _compiler_accepts(flags, src=OPENMP_PROBE):
    """True when the C compiler builds and links the tiny program `src` with `flags`."""
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as fh:
            fh.write(src)
        try:
            result = subprocess.run([cc, *flags, path, "-o", os.path.join(tmp, "probe")],
                                    capture_output=True)
        except OSError:
            return False
        return result.returncode == 0


def _flags():
    # no FP traps or errno are ever read: lets GCC if-convert and vectorise clamps and math calls
    compile_args = ["-O3", "-ffp-contract=fast", "-fno-trapping-math", "-fno-math-errno"] if sys.platform != "win32" else ["/O2"]
    if sys.platform != "win32":  # after Python's own CFLAGS, which hold -g
        compile_args.append("-g" if debug else "-g0")
    link_args = []
    if os.environ.get("FASTLORA_NATIVE") == "1":
        compile_args.append("-march=native")
    if os.environ.get("FASTLORA_NO_OPENMP") != "1" and sys.platform != "win32" \
            and _compiler_accepts(["-fopenmp"]):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    return compile_args, link_args


class BuildExt(build_ext):
    """Probe the compiler only when something is actually built (not for sdist/egg_info), and
    compile the extensions in parallel, one per core."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        compile_args, link_args = _flags()
        if any(ext.name.endswith(SIMD_SUFFIX) for ext in self.extensions) and \
                not _compiler_accepts(SIMD_FLAGS, PLAIN_PROBE):
            self.extensions = [ext for ext in self.extensions if not ext.name.endswith(SIMD_SUFFIX)]
        for ext in self.extensions:
            simd = SIMD_FLAGS if ext.name.endswith(SIMD_SUFFIX) else []
            ext.extra_compile_args = compile_args + simd
            ext.extra_link_args = link_args
        super().build_extensions()


debug = os.environ.get("FASTLORA_DEBUG") == "1"
directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
    "nonecheck": False,
}

# Cython's memoryview types and helpers, shared by every kernel module instead of compiled into
# each (measured: a kernel module's C shrinks from ~1.3 MB to ~0.6 MB and compiles 3x faster)
SHARED_UTILITY = "fastlora._ext._cyutility"
SHARED_UTILITY_SOURCE = os.path.join("build", "cython", "_cyutility.c")
shared_utility = tuple(int(p) for p in Cython.__version__.split(".")[:2] if p.isdigit()) >= (3, 1)

only = {name for name in os.environ.get("FASTLORA_KERNELS", "").split(",") if name}
sources = sorted(glob.glob(os.path.join("csrc", "*.pyx")))
if only:
    sources = [p for p in sources if os.path.splitext(os.path.basename(p))[0] in only]

# Kernels whose time is their own vectorised loops (elementwise passes, row reductions,
# csrc/small_gemm.h's products) are built twice: portable (SSE2 on x86-64) and, as
# <name>_avx2, with AVX2 + FMA; fastlora._ext loads the second on CPUs that have both. (GELU is
# 2.5x faster with them; a -march=native build, FASTLORA_NATIVE=1, needs no second copy.)
SIMD_KERNELS = ("adamw", "attention", "attention_softmax", "cross_entropy", "gelu", "layernorm",
                "linear_cross_entropy", "lora_linear", "dora", "rmsnorm", "rope", "swiglu")
SIMD_SUFFIX = "_avx2"
SIMD_SOURCES = os.path.join("build", "simd_src")


def _simd_source(name):
    """build/simd_src/<name>_avx2.pyx: the kernel's own source, included under another name."""
    os.makedirs(SIMD_SOURCES, exist_ok=True)
    path = os.path.join(SIMD_SOURCES, name + SIMD_SUFFIX + ".pyx")
    text = f'# generated by setup.py: csrc/{name}.pyx, built with {" ".join(SIMD_FLAGS)}\ninclude "{name}.pyx"\n'
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as fh:
            fh.write(text)
    return path


def _extension(module, path):
    return Extension("fastlora._ext." + module, [path], include_dirs=[np.get_include()],
                     define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])


build_simd = platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32" \
    and os.environ.get("FASTLORA_NATIVE") != "1"
extensions = []
for path in sources:
    name = os.path.splitext(os.path.basename(path))[0]
    extensions.append(_extension(name, path))
    if build_simd and name in SIMD_KERNELS:
        extensions.append(_extension(name + SIMD_SUFFIX, _simd_source(name)))

if shared_utility:
    os.makedirs(os.path.dirname(SHARED_UTILITY_SOURCE), exist_ok=True)
    extensions.append(Extension(SHARED_UTILITY, [SHARED_UTILITY_SOURCE]))

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives, include_path=["csrc", "."],
                          nthreads=os.cpu_count() or 1,
                          **({"shared_utility_qualified_name": SHARED_UTILITY} if shared_utility else {})),
    cmdclass={"build_ext": BuildExt},
)

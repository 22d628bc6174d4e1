"""Build the Cython kernels in csrc/ as fastlora._ext.<name> extension modules.

Environment switches (all optional):
  FASTLORA_NATIVE=1        add -march=native (faster, but the build only runs on this CPU)
  FASTLORA_NO_OPENMP=1     build without OpenMP even when the compiler supports it
  FASTLORA_DEBUG=1         turn Cython bounds/wraparound checks back on
  FASTLORA_KERNELS=a,b     (development) build only csrc/a.pyx and csrc/b.pyx
"""
import glob
import os
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _compiler_accepts(flag):
    """True when the C compiler builds and links a tiny OpenMP program with `flag`."""
    cc = os.environ.get("CC", "cc")
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as fh:
            fh.write(src)
        try:
            result = subprocess.run([cc, flag, path, "-o", os.path.join(tmp, "probe")],
                                    capture_output=True)
        except OSError:
            return False
        return result.returncode == 0


def _flags():
    # no FP traps or errno are ever read: lets GCC if-convert and vectorise clamps and math calls
    compile_args = ["-O3", "-ffp-contract=fast", "-fno-trapping-math", "-fno-math-errno"] if sys.platform != "win32" else ["/O2"]
    link_args = []
    if os.environ.get("FASTLORA_NATIVE") == "1":
        compile_args.append("-march=native")
    if os.environ.get("FASTLORA_NO_OPENMP") != "1" and sys.platform != "win32" \
            and _compiler_accepts("-fopenmp"):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    return compile_args, link_args


class BuildExt(build_ext):
    """Probe the compiler only when something is actually built (not for sdist/egg_info)."""

    def build_extensions(self):
        compile_args, link_args = _flags()
        for ext in self.extensions:
            ext.extra_compile_args = compile_args
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

only = {name for name in os.environ.get("FASTLORA_KERNELS", "").split(",") if name}
sources = sorted(glob.glob(os.path.join("csrc", "*.pyx")))
if only:
    sources = [p for p in sources if os.path.splitext(os.path.basename(p))[0] in only]

extensions = [
    Extension(
        "fastlora._ext." + os.path.splitext(os.path.basename(path))[0],
        [path],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for path in sources
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
    cmdclass={"build_ext": BuildExt},
)

"""The runtime under the kernels: threads, NumPy's BLAS, OpenMP, products, attention, malloc.

Each module imports only those listed before it (tests/test_layering.py checks it):

    threads   how many threads the kernels use; fewer while other programs keep cores busy
    blas      NumPy's OpenBLAS: its thread count per call (kept and given back), its GEMM pointers
    openmp    loads libgomp once with a bounded spin count (fastlora._ext calls it first)
    malloc    keeps a step's big buffers in the heap inside fastlora's own work
    process   fastlora.runtime() and set_num_threads: what fastlora changes in the process, and
              gives back
    gemm      the hot paths' matrix products on one OpenMP pool; installs the BLAS pointers that
              the kernels cimport from fastlora._ext.blas (csrc/blas.pyx)
    attention causal attention: the fused kernel or NumPy's stacked products

Nothing here changes the process at import; docs/DESIGN.md ("The runtime") says how it fits.
"""

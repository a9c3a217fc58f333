"""Tunables of fastbptt, in one place.

Kernels read these at compile time; tests may change them before the first call.
"""

#: LLVM fast-math flags for the CPU kernels: everything that lets loops vectorize
#: (reassociation, contraction to FMA, approximate functions) but *not* ``nnan`` /
#: ``ninf``, so that NaN/inf checks on results keep their meaning.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: Activation codes shared by the CPU and CUDA kernels.
ACTIVATIONS = {"tanh": 0, "relu": 1, "identity": 2}

#: Reductions of the per-token cross-entropy: "mean" over all T*B terms, or "sum".
REDUCTIONS = ("mean", "sum")

# ------------------------------------------------------------------------ CUDA (optional)
#: threads per block of the elementwise / row kernels, and the most blocks of a 1-D grid
CUDA_BLOCK = 128
CUDA_MAX_GRID = 4096
#: recurrence path: "auto" (persistent for small batches when H fits), "step", "persistent"
CUDA_RECURRENCE = "auto"
#: the persistent path is taken for B <= this (measured rule: see README's CUDA section)
CUDA_PERSIST_MAX_B = 8
#: hidden columns per block of the persistent kernels (their W_hh slice lives in shared memory)
CUDA_PERSIST_COLS = 32
CUDA_PERSIST_THREADS = 128
#: use CuPy's cuBLAS for the large GEMMs when CuPy is installed
CUDA_USE_CUPY = True

"""Tunables of fastbptt, in one place.

Kernels read these at compile time; tests may change them before the first call.  The
CPU kernels' on-disk cache keeps the values they were compiled with: after changing one,
delete ``fastbptt/__pycache__/*.nbi`` and ``*.nbc`` (numba does not see the change).
"""

#: LLVM fast-math flags for the CPU kernels: everything that lets loops vectorize
#: (reassociation, contraction to FMA, approximate functions) but *not* ``nnan`` /
#: ``ninf``, so that NaN/inf checks on results keep their meaning.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: Cache blocking of the CPU products (``fastbptt._cpu._matmul_acc``): the inner dimension
#: in slices of at most CPU_KC, the rows in panels of CPU_MC (a panel of A and the slice of
#: B under one tile column, 128 KiB each in float32, stay in one core's L2; measured best
#: of KC in {512, 1024, 2048} x MC in {32, 64, 128} at the benchmark shapes).
CPU_KC = 512
CPU_MC = 64

#: The steps of a recurrent sweep are split over the threads when a thread gets at least
#: CPU_MIN_COLS of the output columns and the step has at least CPU_SERIAL_MACS
#: multiply-adds (B·H²), or W_hh takes at least CPU_SPLIT_BYTES per batch row (a
#: small-batch step streams W_hh from L2; split, each thread streams its part): measured,
#: see ``fastbptt._cpu.step_threads``.  A one-thread step with at most CPU_BLAS_STEP_MACS
#: runs through BLAS, below OpenBLAS's own threshold for threads (4·65536).
CPU_SERIAL_MACS = 1 << 16
CPU_SPLIT_BYTES = 36 << 10
CPU_MIN_COLS = 32
CPU_BLAS_STEP_MACS = 65536

#: A thread of a recurrent sweep that has polled this many times for a step of a lane
#: whose thread has not started yet computes that step itself (see ``fastbptt._cpu._sweep``;
#: a threading layer may run a region's lanes one after another).  ≈1 ms of polling.
CPU_WAIT_SPINS = 1 << 20

#: ... and one waiting this many polls for a lane that has started yields its core to the
#: OS between polls: with more threads than cores (two trainings at once) that lane's
#: thread may be waiting for this core.  ≈20 µs of polling, well over a step's imbalance.
CPU_YIELD_SPINS = 1 << 14

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

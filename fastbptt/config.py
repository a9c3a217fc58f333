"""Tunables of fastbptt, in one place.

Kernels read these at compile time; tests may change them before the first call.  The
CPU kernels' on-disk cache is keyed by the engine's sources and these values
(``fastbptt._cpu.cache``): change one and the kernels recompile.  What depends on the CPU
is not here but in the measured plan (``fastbptt._cpu.plan``, ``fastbptt tune``).
"""

#: LLVM fast-math flags for the CPU kernels: everything that lets loops vectorize
#: (reassociation, contraction to FMA, approximate functions) but *not* ``nnan`` /
#: ``ninf``, so that NaN/inf checks on results keep their meaning.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: ... and for the cells' pointwise parts (gates, φ, their derivatives, tanh / exp): the same
#: but reassociation, which only reductions need to vectorize, and contraction to FMA.  With
#: them, LLVM regrouped a product of several factors (the LSTM's) and fused a·b + c (the
#: GRU's) one way where it compiled a kernel and another where a cached kernel was loaded, so
#: the first process's gradients differed from later ones' in the last bits; without them
#: every process sums and multiplies alike (docs/performance.md, "the same bits").
FASTMATH_POINTWISE = FASTMATH - {"reassoc", "contract"}

#: A thread of a recurrent sweep that has polled this many times for a step of a lane
#: whose thread has not started yet computes that lane's steps itself (see
#: ``fastbptt._cpu.lanes``; a threading layer may run a region's lanes one after another).
CPU_WAIT_SPINS = 1 << 20

#: ... and one that has polled this many times for a lane that has started takes that
#: lane's next step if its thread has not (it lost its core), else yields its core
#: between polls: a few tens of µs, well over a step's usual imbalance.
CPU_STEAL_SPINS = 1 << 14

#: ... and one that has waited this many times its own last step for a step that another
#: thread holds runs every remaining step of the sweep itself (that thread lost its core).
CPU_SOLO_WAIT = 4

#: Each kind of call runs on all the threads or on one, whichever its own recent calls
#: measured faster; the other is tried again after CPU_TEAM_EXPLORE calls, then after
#: twice as many each time it loses, at most CPU_TEAM_EXPLORE_MAX (``fastbptt._cpu.team``).
#: False: always all the threads.
CPU_TEAM_ADAPT = True
CPU_TEAM_EXPLORE = 8
CPU_TEAM_EXPLORE_MAX = 64
#: ... and after a switch to one thread, all the threads are tried again after this many
#: calls, then twice as many each time they lose
CPU_TEAM_RETRY_ALL = 2

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

#: The CPU backend keeps a call's work buffers for the next call of the same shapes
#: (refilling is cheaper than first-touching fresh pages), but never a set larger than this.
CPU_SCRATCH_BYTES = 256 << 20

#: Measure the CPU products' blocking the first time the engine runs on a machine (about
#: two seconds), and a large product's own the first time one of its shape runs (kept in
#: the plan: ``fastbptt._cpu.plan``); False: the documented defaults.
CPU_AUTOTUNE = True

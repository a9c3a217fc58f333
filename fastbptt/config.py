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

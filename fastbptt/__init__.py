"""fastbptt: fast, exact Backpropagation Through Time for recurrent networks.

    params = fastbptt.init_params(D, H, Q, seed=0)
    loss, grads, h_T = fastbptt.loss_and_grad(params, X, Y)

Importing compiles nothing and needs no GPU; kernels compile on first use and are
cached on disk.
"""
from .api import cell_of, init_params, loss, loss_and_grad, rnn_adjoints, rnn_backward, rnn_forward, to_device
from .generation import generate
from .trainer import train
from .truncation import Randomized, Truncated

__version__ = "0.1.0"

__all__ = ["init_params", "cell_of", "loss_and_grad", "loss", "rnn_forward", "rnn_backward", "rnn_adjoints",
           "to_device", "Truncated", "Randomized", "train", "generate", "__version__"]

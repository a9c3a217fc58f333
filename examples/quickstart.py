"""The README's API example: one loss and gradient of a character-level RNN minibatch."""
import numpy as np

import fastbptt

T, B, V, H = 35, 32, 28, 512                     # the book's from-scratch setting
rng = np.random.default_rng(0)
params = fastbptt.init_params(V, H, V, seed=0)   # float32, std 0.01, as in the book
X = rng.integers(0, V, (T, B))                   # token ids: one-hot input, never materialized
Y = rng.integers(0, V, (T, B))                   # next-token targets

loss, grads, h_T = fastbptt.loss_and_grad(params, X, Y)
print(f"loss {loss:.4f} (log V = {np.log(V):.4f}), perplexity {np.exp(loss):.2f}")
print("grad norms:", {k: float(np.linalg.norm(g)) for k, g in grads.items()})

# the same gradient, truncated per term after 5 steps, and randomized (unbiased)
_, g5, _ = fastbptt.loss_and_grad(params, X, Y, truncation=fastbptt.Truncated(5))
_, gr, _ = fastbptt.loss_and_grad(params, X, Y, truncation=fastbptt.Randomized(0.5, seed=1))
print("‖∂W_hh‖ full / Truncated(5) / Randomized(0.5):",
      *(f"{np.linalg.norm(g['W_hh']):.3e}" for g in (grads, g5, gr)))

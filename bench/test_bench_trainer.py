"""The trainer's overhead: one epoch of the book's run (first 10,000 tokens, H=512, T=35,
B=32, SGD, clipping) against the same minibatches through bare loss_and_grad calls, in
one benchmark group, both from the same parameters (trained for 20 epochs first: the
kernels' speed depends a little on the values).  Compile time is excluded (a warm-up
epoch before timing)."""
import numpy as np
import pytest

import fastbptt
from fastbptt import data, trainer


@pytest.fixture(scope="module")
def book():
    cfg = trainer.TrainConfig(max_chars=10000).resolved()
    corpus = trainer.load_corpus(cfg)
    params = fastbptt.train(max_chars=10000, epochs=20, quiet=True, sample_prefixes=()).params
    return cfg, corpus, params


def test_trainer_epoch(benchmark, book):
    cfg, corpus, params = book
    params = {k: v.copy() for k, v in params.items()}
    opt = trainer.SGD(params, cfg.lr)
    rng = np.random.default_rng(0)
    epoch = lambda: trainer.train_epoch(params, opt, corpus.train, cfg, rng, None)   # noqa: E731
    epoch()
    benchmark.group = "book epoch"
    benchmark(epoch)


def test_bare_loss_and_grad_epoch(benchmark, book):
    cfg, corpus, params = book
    rng = np.random.default_rng(0)
    batches = list(data.sequential_batches(corpus.train, cfg.batch_size, cfg.num_steps, rng))

    def epoch():
        state = None
        for X, Y in batches:
            _, _, state = fastbptt.loss_and_grad(params, X, Y, state)
    epoch()
    benchmark.group = "book epoch"
    benchmark(epoch)

"""Tokenization, vocabulary and the book's two minibatch samplers."""
import re

import numpy as np
import pytest

from fastbptt import data

BOOK_ORDER = ["<unk>", " ", "e", "t", "a", "i", "n", "o", "s", "h", "r", "d", "l", "m", "u", "c",
              "f", "w", "g", "y", "p", "b", "v", "k", "x", "z", "j", "q"]


def test_embedded_corpus_book_tokenization_counts():
    tokens = data.tokenize(data.load_text(), "book")
    assert len(tokens) == 170580
    vocab = data.Vocab(tokens)
    assert len(vocab) == 28
    assert vocab.idx_to_token == BOOK_ORDER
    assert "".join(tokens[:40]) == "the time machine by h g wellsithe time t"


def test_chars_tokenization_and_unknowns():
    vocab = data.Vocab(data.tokenize("abca\n", "chars"))
    assert vocab.idx_to_token == ["<unk>", "a", "b", "c", "\n"]
    np.testing.assert_array_equal(vocab.encode(list("abz")), [1, 2, 0])
    assert vocab.unknown("abz!") == ["!", "z"]
    assert vocab.decode([1, 2, 3]) == "abc"


def test_unknown_tokenizer_names_the_parameter():
    with pytest.raises(ValueError, match=r"^mode: expected one of book, chars, got 'words'$"):
        data.tokenize("x", "words")


@pytest.mark.parametrize("content, pattern", [
    (b"", "empty"), (b"  \n ", "empty"), (b"ab\x00cd", "binary"), (b"\xff\xfe\xfa abc", "not UTF-8"),
])
def test_bad_text_files(tmp_path, content, pattern):
    f = tmp_path / "t.txt"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=f"^path: {re.escape(str(f))} .*{pattern}") as e:
        data.load_text(f)
    assert "--" not in str(e.value).replace(str(f), "")   # a parameter, not a CLI flag


def test_missing_text_file_names_the_parameter(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError) as e:
        data.load_text(missing)
    assert str(e.value) == f"path: no such file: {missing}"


def test_check_length_names_the_parameter_and_the_fix():
    data.check_length(4 * 7 + 1, 7, 4)                                   # exactly one minibatch
    with pytest.raises(ValueError) as e:
        data.check_length(4 * 7, 7, 4, "training split")
    msg = str(e.value)
    assert msg.startswith("n_tokens: the training split has 28 tokens, fewer than one minibatch")
    assert "num_steps·batch_size + 1 = 29" in msg and "smaller num_steps/batch_size" in msg
    assert "--" not in msg


def test_sequential_batches_continue_rows_and_cover():
    corpus = np.arange(1000)
    rng = np.random.default_rng(1)
    batches = list(data.sequential_batches(corpus, 4, 7, rng))
    assert len(batches) > 10
    for (X, Y) in batches:
        assert X.shape == Y.shape == (7, 4)
        np.testing.assert_array_equal(Y, X + 1)                    # next-token targets
    for (X0, _), (X1, _) in zip(batches, batches[1:]):
        np.testing.assert_array_equal(X1[0], X0[-1] + 1)           # rows continue: state can carry
    seen = np.concatenate([X.ravel() for X, _ in batches])
    assert len(np.unique(seen)) == len(seen)                       # no token twice
    offset = seen.min()
    assert 0 <= offset <= 7
    assert len(seen) >= 1000 - 7 - 1 - 4 * 7 * 2                   # all but the ragged ends


def test_random_batches_are_shuffled_non_overlapping_windows():
    corpus = np.arange(1000)
    batches = list(data.random_batches(corpus, 5, 10, np.random.default_rng(2)))
    starts = np.concatenate([X[0] for X, _ in batches])
    assert len(batches) == ((1000 - starts.min() - 1) // 10) // 5
    for X, Y in batches:
        assert X.shape == (10, 5)
        np.testing.assert_array_equal(X, X[0] + np.arange(10)[:, None])   # contiguous windows
        np.testing.assert_array_equal(Y, X + 1)
    assert len(np.unique(starts)) == len(starts)
    assert np.all((starts - starts.min()) % 10 == 0)                      # non-overlapping
    assert not np.all(np.diff(starts) > 0)                                # shuffled
    a = [X for X, _ in data.random_batches(corpus, 5, 10, np.random.default_rng(2))]
    assert all(np.array_equal(x, X) for x, (X, _) in zip(a, batches))     # seeded


def test_samplers_work_at_the_minimum_length():
    corpus = np.arange(4 * 7 + 1)
    for sampler in data.SAMPLERS.values():
        for seed in range(5):
            assert len(list(sampler(corpus, 4, 7, np.random.default_rng(seed)))) == 1


def test_eval_batches_cover_the_split_once():
    corpus = np.arange(103)
    seen = np.concatenate([X.ravel() for X, _ in data.eval_batches(corpus, 4, 10)])
    assert sorted(seen) == list(range(100))


@pytest.mark.parametrize("batches", [data.sequential_batches, data.random_batches])
def test_samplers_name_bad_sizes_and_too_short_a_corpus(batches):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"^corpus: 10 tokens, fewer than the 21 that batch_size=4 and num_steps=5"):
        next(batches(np.arange(10), 4, 5, rng))
    for bad, name in (((0, 5), "batch_size"), ((4, 0), "num_steps"), ((4, True), "num_steps")):
        with pytest.raises(ValueError, match=f"^{name}: expected a positive integer"):
            next(batches(np.arange(100), *bad, rng))
    with pytest.raises(TypeError, match="^corpus: expected a 1-D array of integer token ids"):
        next(batches(np.ones((10, 10)), 2, 2, rng))
    X, Y = next(batches(list(range(100)), 4, 5, rng))              # a list of ids is an array of them
    assert X.shape == Y.shape == (5, 4) and np.array_equal(X + 1, Y)


def test_eval_batches_name_bad_sizes():
    with pytest.raises(ValueError, match="^num_steps: expected a positive integer, got 0"):
        next(data.eval_batches(np.arange(100), 4, 0))
    with pytest.raises(ValueError, match="^corpus: 1 tokens"):
        next(data.eval_batches(np.arange(1), 4, 5))

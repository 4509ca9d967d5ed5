"""The download-free word-hash text encoder: fixed vectors per word, the padding mask, truncation."""

import hashlib
import logging

import numpy as np
import torch

from causalvdm.text import WordHashEncoder
from causalvdm.text.words import END, split_words, word_vector


def test_word_vector_is_its_hash_read_as_int16():
    # An independent reading of the same bytes: little-endian int16, centred, scaled to unit variance.
    enc = WordHashEncoder(output_dim=8, model_max_length=4)
    y, mask = enc.encode(["Rabbit"])
    raw = np.frombuffer(hashlib.shake_256(b"rabbit").digest(16), dtype="<i2").astype(np.float64)
    assert torch.equal(y[0, 0], torch.tensor((raw + 0.5) * np.sqrt(3) / 32768, dtype=torch.float32))
    assert mask.tolist() == [[True, True, False, False]]
    assert torch.equal(y[0, 2:], torch.zeros(2, 8))


def test_words_end_token_and_mask():
    enc = WordHashEncoder(output_dim=16, model_max_length=8)
    y, mask = enc.encode(["a man, in a car!", "", "A MAN in a car"])
    assert split_words("a man, in a car!") == ["a", "man", "in", "a", "car"]
    assert mask.sum(1).tolist() == [6, 1, 6]  # five words + the end token; an empty prompt has the end token alone
    assert torch.equal(y[0], y[2])  # case and punctuation do not change a caption
    assert torch.equal(y[0, 0], y[0, 3])  # the same word is the same vector wherever it stands
    assert torch.equal(y[1, 0], word_vector(END, 16)) and torch.equal(y[0, 5], y[1, 0])
    assert not torch.equal(y[0, 1], y[0, 4])
    assert abs(float(y[0, :5].std()) - 1.0) < 0.5


def test_long_prompts_are_cut_with_one_warning(caplog):
    enc = WordHashEncoder(output_dim=4, model_max_length=3)
    with caplog.at_level(logging.WARNING, logger="causalvdm.text.words"):
        y, mask = enc.encode(["one two three four", "one"])
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert torch.equal(y[0, 2], y[1, 1])  # the end token follows the words that fit
    assert len(caplog.records) == 1 and "1 prompt(s)" in caplog.text and "2 word(s)" in caplog.text

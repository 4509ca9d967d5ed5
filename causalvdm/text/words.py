"""A text encoder with nothing to download: each word is a fixed pseudo-random vector read from its hash.

For small models trained from scratch on a handful of captions (the demo): the model's caption projection and
cross-attention learn what the words mean. The vectors come from SHAKE-256 of the word, so the same word gives
the same vector bit for bit on every machine, and a caption typed later reuses the vectors of the words it shares
with the training captions.
"""

import hashlib
import logging
import re

import torch
from torch import nn

from causalvdm.registry import TEXT_ENCODERS
from causalvdm.text.prompts import prompt_list

log = logging.getLogger(__name__)

END = "</s>"  # appended to every prompt, so even an empty one has a token to attend to


def word_vector(word: str, dim: int) -> torch.Tensor:
    """(dim,) float32, uniform in [-sqrt(3), sqrt(3)) (unit variance), from SHAKE-256 of the UTF-8 word."""
    raw = torch.frombuffer(bytearray(hashlib.shake_256(word.encode()).digest(2 * dim)), dtype=torch.int16)
    return (raw.float() + 0.5) * (3**0.5 / 32768)


def split_words(prompt: str) -> list[str]:
    """Lowercase words and numbers of a prompt, in order; punctuation and spacing are dropped."""
    return re.findall(r"[^\W_]+", prompt.lower())


@TEXT_ENCODERS.register_module()
class WordHashEncoder(nn.Module):
    """Prompts -> y (B, model_max_length, output_dim) float32 (one hashed vector per word, then an end token, then
    zeros), mask (B, model_max_length) bool. Words beyond model_max_length - 1 are cut (one warning per call)."""

    def __init__(self, output_dim: int = 64, model_max_length: int = 24):
        super().__init__()
        if output_dim < 1 or model_max_length < 2:
            raise ValueError(f"need output_dim >= 1 and model_max_length >= 2, got {output_dim}, {model_max_length}")
        self.output_dim, self.model_max_length = output_dim, model_max_length
        self._vectors: dict[str, torch.Tensor] = {}

    def _vector(self, word: str) -> torch.Tensor:
        if word not in self._vectors:
            self._vectors[word] = word_vector(word, self.output_dim)
        return self._vectors[word]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (B strings) -> y (B, model_max_length, output_dim) float32, mask (B, model_max_length) bool."""
        prompts = prompt_list(prompts)
        y = torch.zeros(len(prompts), self.model_max_length, self.output_dim)
        mask = torch.zeros(len(prompts), self.model_max_length, dtype=torch.bool)
        cut = []
        for i, prompt in enumerate(prompts):
            words = split_words(prompt)
            if len(words) > self.model_max_length - 1:
                cut.append(len(words) - self.model_max_length + 1)
                words = words[:self.model_max_length - 1]
            for j, word in enumerate([*words, END]):
                y[i, j] = self._vector(word)
            mask[i, :len(words) + 1] = True
        if cut:
            log.warning("%d prompt(s) longer than model_max_length=%d tokens were truncated: %d word(s) cut in all "
                        "(up to %d from one prompt)", len(cut), self.model_max_length, sum(cut), max(cut))
        return y, mask

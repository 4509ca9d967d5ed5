"""Text encoders: prompts -> token embeddings (B, L, C_text) and a padding mask (B, L)."""

from causalvdm.text.t5 import NullTextEncoder, T5Encoder
from causalvdm.text.words import WordHashEncoder

__all__ = ["NullTextEncoder", "T5Encoder", "WordHashEncoder"]

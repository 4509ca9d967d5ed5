"""Models: the causal ST-DiT, its layers, positional embeddings and the shared KV cache."""

from causalvdm.models.causal_stdit import PRESETS, CausalSTDiT
from causalvdm.models.kv_cache import KVCache

__all__ = ["PRESETS", "CausalSTDiT", "KVCache"]

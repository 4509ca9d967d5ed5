"""The T5 text encoder (transformers, from a local t5-v1_1-xxl folder) and the null encoder of unconditional models."""

import logging
from collections import OrderedDict

import torch
from torch import nn

from causalvdm.registry import TEXT_ENCODERS, ConfigError
from causalvdm.text.prompts import prompt_list
from causalvdm.utils.dtypes import resolve_dtype
from causalvdm.utils.weights import check_model_dir

log = logging.getLogger(__name__)


@TEXT_ENCODERS.register_module()
class T5Encoder(nn.Module):
    """Frozen T5 encoder: prompts -> y (B, model_max_length, d_model) float32, mask (B, model_max_length) bool.

    Prompts are padded to `model_max_length` tokens and truncated beyond it (one warning per call
    says how many tokens were cut). Embeddings of the last `cache_size` distinct prompts are kept
    (LRU), so a dataset with repeated captions runs the encoder once per caption.
    """

    def __init__(self, from_pretrained: str, model_max_length: int = 120, dtype: str = "auto", cache_size: int = 1024):
        super().__init__()
        from transformers import AutoTokenizer, T5EncoderModel  # deferred: slow import, only needed here

        if model_max_length < 1 or cache_size < 0:
            raise ValueError(f"need model_max_length >= 1 and cache_size >= 0, got {model_max_length}, {cache_size}")
        directory = check_model_dir(from_pretrained, "text_encoder.from_pretrained", "T5 encoder (t5-v1_1-xxl)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(directory, local_files_only=True, dtype=resolve_dtype(dtype))
        except (OSError, ValueError, RuntimeError, ImportError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{directory}: cannot load T5 ({reason[:200]}) (check text_encoder.from_pretrained)") from err
        self.model.requires_grad_(False).eval()
        self.model_max_length = model_max_length
        self.output_dim = self.model.config.d_model
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _run(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and encode distinct prompts -> (N, L, d_model) float32, (N, L) bool."""
        lengths = [len(ids) for ids in self.tokenizer(prompts, verbose=False)["input_ids"]]  # with EOS
        cut = [n - self.model_max_length for n in lengths if n > self.model_max_length]
        if cut:
            log.warning("%d prompt(s) longer than model_max_length=%d tokens were truncated: %d token(s) cut in all "
                        "(up to %d from one prompt)", len(cut), self.model_max_length, sum(cut), max(cut))
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.model_max_length,
                                return_tensors="pt").to(self.model.device)
        y = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return y.float(), tokens.attention_mask.bool()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (B strings) -> y (B, model_max_length, d_model) float32, mask (B, model_max_length) bool."""
        prompts = prompt_list(prompts)
        new = list(dict.fromkeys(p for p in prompts if p not in self._cache))  # distinct, in order
        fresh = {}
        if new:
            y, mask = self._run(new)
            fresh = {p: (y[i].clone(), mask[i].clone()) for i, p in enumerate(new)}  # not views of the batch
        rows = []
        for p in prompts:
            if p in fresh:
                rows.append(fresh[p])
            else:
                self._cache.move_to_end(p)
                rows.append(self._cache[p])
        # Insert after the lookups, so a batch with more distinct prompts than cache_size still finds its own.
        for p, row in fresh.items():
            if self.cache_size:
                self._cache[p] = row
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        y, mask = zip(*rows)
        return torch.stack(y), torch.stack(mask)


@TEXT_ENCODERS.register_module()
class NullTextEncoder(nn.Module):
    """The text encoder of unconditional models: output_dim 0, encode(prompts) -> (None, None)."""

    output_dim = 0
    model_max_length = 0

    def encode(self, prompts: list[str]) -> tuple[None, None]:
        """No text: the model is built with caption_channels = 0."""
        return None, None

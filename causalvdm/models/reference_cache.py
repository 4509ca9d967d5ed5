"""A naive KV cache for verification (tests, tools/verify_cache.py): it keeps every frame and concatenates, so
the ring buffer of `KVCache` can be checked against it after evictions. Slow and unbounded on purpose."""

import torch

from causalvdm.models.kv_cache import staged_mask
from causalvdm.models.positional import apply_rope, rope_cos_sin
from causalvdm.models.spatial_prefix import spatial_context


class ReferenceSpatialPrefix:
    """The naive spatial prefix: keeps every written frame's spatial keys/values and concatenates the frames the
    rule names for a chunk; implements `SpatialCallCache` as `SpatialPrefixRing` does."""

    def __init__(self, num_layers: int, spatial_prefix: str | None):
        self.spatial_prefix = spatial_prefix
        # spatial keys/values of every written frame, (B, H, S, Dh) each, by position
        self.frame_keys: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.frame_values: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.staged: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self._start = self._num_new = 0

    def begin(self, start: int, num_frames: int) -> None:
        """Start the cache's call on frames start.. start + num_frames - 1."""
        self._start, self._num_new = start, num_frames

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Hold this write's spatial keys/values (B*T, H, S, Dh) of `layer` until `commit`."""
        self.staged[layer] = (k.detach(), v.detach())

    def mask(self, tokens_per_frame: int, device) -> None:
        """No empty slots to hide: the context is exactly the frames the rule names."""

    def context(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The frames the rule names for a chunk starting here, concatenated -> (B, H, n * S, Dh) each, or None."""
        frames = spatial_context(self.spatial_prefix, self._start)
        if not frames:
            return None, None
        keys, values = self.frame_keys[layer], self.frame_values[layer]
        return torch.cat([keys[p] for p in frames], dim=2), torch.cat([values[p] for p in frames], dim=2)

    def commit(self) -> None:
        """Keep the spatial keys/values of every frame of the call's write."""
        for layer, staged in enumerate(self.staged):
            if staged is not None:
                for store, new in zip((self.frame_keys[layer], self.frame_values[layer]), staged):
                    frames = new.view(-1, self._num_new, *new.shape[1:])  # (B, T, H, S, Dh)
                    store.extend(frames.unbind(1))
        self.staged = [None] * len(self.staged)


class ReferenceKVCache:
    """A naive cache for verification: keeps every frame, concatenates, attends to the last `max_cond_frames`.

    Implements `CallCache` as `KVCache` does; slow and unbounded on purpose.
    """

    def __init__(self, num_layers: int, max_cond_frames: int, spatial_prefix: str | None = None, sink_frames: int = 0,
                 rotate_sink: bool = False):
        self.max_cond_frames = max_cond_frames
        self.sink_frames = sink_frames
        self.rotate_sink = rotate_sink
        self.spatial = ReferenceSpatialPrefix(num_layers, spatial_prefix)
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.staged: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.next_position = 0
        self._num_new = 0

    def __len__(self) -> int:
        return len(self._in_view())

    def _in_view(self) -> list[int]:
        """Positions of the frames attended to: the first `sink_frames`, then the last `max_cond_frames` of the rest."""
        sink = list(range(min(self.next_position, self.sink_frames)))
        return sink + list(range(max(self.sink_frames, self.next_position - self.max_cond_frames), self.next_position))

    def allocate(self, *args) -> None:
        """Nothing to preallocate: this cache grows by concatenation."""

    def begin(self, num_frames: int) -> torch.Tensor:
        self._num_new = num_frames
        self.spatial.begin(self.next_position, num_frames)
        return self.call_positions

    @property
    def call_positions(self) -> torch.Tensor:
        """Absolute positions of the current call's frames (T,)."""
        return torch.arange(self.next_position, self.next_position + self._num_new)

    def attn_mask(self, bidirectional: bool, device: torch.device) -> torch.Tensor:
        past = torch.ones(self._num_new, len(self), dtype=torch.bool)
        return torch.cat([past, staged_mask(self._num_new, bidirectional)], dim=1).to(device)

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.staged[layer] = (k.detach(), v.detach())

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.stage(layer, k, v)
        view = self._in_view()
        keys = [torch.cat(self.keys[layer], dim=2)[:, :, view]] if view else []
        values = [torch.cat(self.values[layer], dim=2)[:, :, view]] if view else []
        sink = min(self.next_position, self.sink_frames)
        shift = max(self.sink_frames, self.next_position - self.max_cond_frames) - self.sink_frames
        if self.rotate_sink and sink and shift:  # RoPE: the sink sits just before the oldest rolling frame
            cos, sin = rope_cos_sin(torch.tensor([shift]), k.shape[-1])
            turned = apply_rope(keys[0][:, :, :sink], cos.to(k.device), sin.to(k.device))
            keys = [torch.cat([turned, keys[0][:, :, sink:]], dim=2)]
        return torch.cat(keys + [k], dim=2), torch.cat(values + [v], dim=2)

    def commit(self) -> None:
        for layer, (k, v) in enumerate(self.staged):
            self.keys[layer].append(k)
            self.values[layer].append(v)
        self.spatial.commit()
        self.staged = [None] * len(self.staged)
        self.next_position += self._num_new
        self._num_new = 0

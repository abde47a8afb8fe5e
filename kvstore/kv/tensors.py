"""Turn the KV caches models hand out into LMCache chunk tensors, one copy per chunk.

Accepted: LMCache's own ``[2, L, T, H*D]`` tensor (``[1, L, T, D]`` for MLA); a per-layer
sequence of ``(k, v)`` pairs, each ``[1, H, T, D]`` (as transformers gives) or ``[T, H, D]``;
a transformers cache object (``DynamicCache`` and friends); for MLA, a per-layer sequence of
latent tensors ``[T, D]`` or ``[1, T, D]``. Each chunk is built by copying straight from the
source into a fresh contiguous tensor: that copy is the only one its bytes ever get.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvstore.errors import ConfigError
from kvstore.kv.layout import KVLayout


class ChunkSource:
    """A model's KV cache seen as LMCache chunks: ``chunk(start, end)`` gives a contiguous tensor."""

    def __init__(self, num_tokens: int, layout: KVLayout, fill: Callable[[Any, int, int], None]) -> None:
        self.num_tokens = num_tokens
        self.layout = layout
        self._fill = fill

    def chunk(self, start: int, end: int) -> Any:
        import torch

        out = torch.empty(self.layout.chunk_shape(end - start), dtype=self.layout.torch_dtype)
        self._fill(out, start, end)
        return out


def chunk_source(kv: Any, layout: KVLayout) -> ChunkSource:
    """Recognise ``kv``'s form and check its shape against ``layout``."""
    import torch

    if isinstance(kv, torch.Tensor):
        return _from_lmcache_tensor(kv, layout)
    layers = _layers_of(kv)
    if len(layers) != layout.num_layers:
        raise ConfigError(f"the KV cache has {len(layers)} layers, the layout {layout.num_layers}")
    if layout.mla:
        return _from_mla_layers(layers, layout)
    return _from_kv_layers(layers, layout)


def _layers_of(kv: Any) -> list[Any]:
    if hasattr(kv, "layers") and all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in kv.layers):
        return [(layer.keys, layer.values) for layer in kv.layers]  # transformers >= 4.56 Cache objects
    if hasattr(kv, "key_cache") and hasattr(kv, "value_cache"):
        return list(zip(kv.key_cache, kv.value_cache))
    if hasattr(kv, "to_legacy_cache"):
        return list(kv.to_legacy_cache())
    try:
        return list(kv)
    except TypeError:
        raise ConfigError(f"cannot read a KV cache from a {type(kv).__name__}") from None


def _from_lmcache_tensor(kv: Any, layout: KVLayout) -> ChunkSource:
    expected = layout.chunk_shape(kv.shape[2] if kv.ndim == 4 else 0)
    if kv.ndim != 4 or tuple(kv.shape) != expected:
        raise ConfigError(f"a KV tensor must have LMCache's shape {list(expected[:2])} + [T, {expected[3]}] "
                          f"({layout.fmt}), got {list(kv.shape)}")
    return ChunkSource(kv.shape[2], layout, lambda out, s, e: out.copy_(kv[:, :, s:e]))


def _as_thd(t: Any, layout: KVLayout, what: str) -> Any:
    """A ``[T, H, D]`` view of a ``[1, H, T, D]`` or ``[T, H, D]`` tensor (no copy)."""
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0].transpose(0, 1)
    if t.ndim != 3 or tuple(t.shape[1:]) != (layout.num_kv_heads, layout.head_dim):
        raise ConfigError(f"{what} must be [1, {layout.num_kv_heads}, T, {layout.head_dim}] or "
                          f"[T, {layout.num_kv_heads}, {layout.head_dim}], got {list(t.shape)}")
    return t


def _from_kv_layers(layers: list[Any], layout: KVLayout) -> ChunkSource:
    views = []
    for i, pair in enumerate(layers):
        if len(pair) != 2:
            raise ConfigError(f"layer {i} is not a (key, value) pair")
        views.append((_as_thd(pair[0], layout, f"layer {i} keys"), _as_thd(pair[1], layout, f"layer {i} values")))
    num_tokens = views[0][0].shape[0]
    if any(k.shape[0] != num_tokens or v.shape[0] != num_tokens for k, v in views):
        raise ConfigError("every layer's keys and values must cover the same number of tokens")

    def fill(out: Any, start: int, end: int) -> None:
        t = end - start
        for layer, (k, v) in enumerate(views):
            out[0, layer].view(t, layout.num_kv_heads, layout.head_dim).copy_(k[start:end])
            out[1, layer].view(t, layout.num_kv_heads, layout.head_dim).copy_(v[start:end])

    return ChunkSource(num_tokens, layout, fill)


def _from_mla_layers(layers: list[Any], layout: KVLayout) -> ChunkSource:
    views = []
    for i, latent in enumerate(layers):
        while latent.ndim > 2 and latent.shape[0] == 1:
            latent = latent[0]
        if latent.ndim != 2 or latent.shape[1] != layout.head_dim:
            raise ConfigError(f"layer {i} latent cache must be [T, {layout.head_dim}], got {list(latent.shape)}")
        views.append(latent)
    num_tokens = views[0].shape[0]
    if any(v.shape[0] != num_tokens for v in views):
        raise ConfigError("every layer must cover the same number of tokens")

    def fill(out: Any, start: int, end: int) -> None:
        for layer, latent in enumerate(views):
            out[0, layer].copy_(latent[start:end])

    return ChunkSource(num_tokens, layout, fill)

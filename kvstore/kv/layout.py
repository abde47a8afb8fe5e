"""``KVLayout``: the shape of one model's KV cache as LMCache lays out its chunks.

A chunk of ``T`` tokens is one tensor of ``[2, L, T, H*D]`` (format ``KV_2LTD``: keys then
values, per layer, per token) or, for multi-head latent attention, ``[1, L, T, D]``
(``KV_MLA_FMT``). The object stored for a chunk is exactly that tensor's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvstore.errors import ConfigError
from kvstore.naming import META_DTYPES, META_FMT, META_SHAPES, META_TOKENS

FORMATS = ("KV_2LTD", "KV_MLA_FMT")

# LMCache's dtype names (CacheEngineKey) for the dtypes a KV cache can have.
_DTYPE_NAMES = {
    "float16": "half", "half": "half", "fp16": "half",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float", "float": "float", "fp32": "float",
    "float64": "double", "double": "double",
    "uint8": "uint8", "int8": "int8",
    "float8_e4m3fn": "fp8_e4m3fn", "fp8_e4m3fn": "fp8_e4m3fn",
}
_TORCH_NAMES = {
    "half": "float16", "bfloat16": "bfloat16", "float": "float32", "double": "float64",
    "uint8": "uint8", "int8": "int8", "fp8_e4m3fn": "float8_e4m3fn",
}
_ITEM_SIZES = {"half": 2, "bfloat16": 2, "float": 4, "double": 8, "uint8": 1, "int8": 1, "fp8_e4m3fn": 1}


def dtype_name(dtype: Any) -> str:
    """LMCache's name for a dtype given as a torch dtype or a string (``"bf16"``, ``"torch.float16"``)."""
    text = str(dtype).removeprefix("torch.")
    try:
        return _DTYPE_NAMES[text]
    except KeyError:
        raise ConfigError(f"unsupported KV dtype {dtype!r}; one of {sorted(set(_DTYPE_NAMES))}") from None


@dataclass(frozen=True)
class KVLayout:
    """What fixes the bytes of a chunk: layers, KV heads, head size, dtype, chunk size, format.

    For ``KV_MLA_FMT`` ``num_kv_heads`` is 1 and ``head_dim`` is the latent width.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    chunk_size: int = 256
    fmt: str = "KV_2LTD"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for field in ("num_layers", "num_kv_heads", "head_dim", "chunk_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"KVLayout.{field} must be a positive integer, got {value!r}")
        if self.fmt not in FORMATS:
            raise ConfigError(f"KVLayout.fmt must be one of {FORMATS}, got {self.fmt!r}")
        if self.fmt == "KV_MLA_FMT" and self.num_kv_heads != 1:
            raise ConfigError("KV_MLA_FMT has one latent head: num_kv_heads must be 1")

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_lmcache_metadata(cls, meta: Any) -> KVLayout:
        """From an ``LMCacheMetadata`` (its ``kv_shape`` is ``(L, 2 or 1, chunk, H, D)``)."""
        num_layers, kv_size, chunk_size, heads, head_dim = meta.kv_shape
        mla = bool(getattr(meta, "use_mla", False)) or kv_size == 1
        return cls(num_layers, heads, head_dim, dtype_name(meta.kv_dtype), chunk_size,
                   "KV_MLA_FMT" if mla else "KV_2LTD")

    @classmethod
    def from_hf_config(cls, config: Any, *, dtype: Any = None, chunk_size: int = 256) -> KVLayout:
        """From a transformers ``PretrainedConfig`` (or its dict); dtype defaults to the config's."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        layers = get("num_hidden_layers")
        heads = get("num_attention_heads")
        if layers is None or heads is None:
            raise ConfigError("the model config has no num_hidden_layers / num_attention_heads")
        kv_heads = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or get("hidden_size") // heads
        if dtype is None:
            dtype = get("torch_dtype") or get("dtype")
            if dtype is None:
                raise ConfigError("the model config names no dtype: pass dtype=")
        return cls(layers, kv_heads, head_dim, dtype_name(dtype), chunk_size)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def mla(self) -> bool:
        return self.fmt == "KV_MLA_FMT"

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, _TORCH_NAMES[self.dtype])

    @property
    def item_size(self) -> int:
        return _ITEM_SIZES[self.dtype]

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        """LMCache's tensor shape for a chunk of ``num_tokens`` tokens."""
        return (1 if self.mla else 2, self.num_layers, num_tokens, self.num_kv_heads * self.head_dim)

    def token_bytes(self) -> int:
        kv, layers, _, hidden = self.chunk_shape(1)
        return kv * layers * hidden * self.item_size

    def chunk_bytes(self, num_tokens: int) -> int:
        return self.token_bytes() * num_tokens

    def lmcache_kv_shape(self) -> tuple[int, int, int, int, int]:
        """``LMCacheMetadata.kv_shape`` for this layout."""
        return (self.num_layers, 1 if self.mla else 2, self.chunk_size, self.num_kv_heads, self.head_dim)




def chunk_metadata(layout: KVLayout, num_tokens: int) -> dict[str, str]:
    """The metadata stored with a chunk of ``num_tokens`` tokens."""
    return {
        META_SHAPES: "x".join(str(n) for n in layout.chunk_shape(num_tokens)),
        META_DTYPES: _TORCH_NAMES[layout.dtype],
        META_FMT: layout.fmt,
        META_TOKENS: str(num_tokens),
    }

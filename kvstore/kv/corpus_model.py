"""``HFModel``: a local transformers model directory as a dumper needs it.

Its KV layout (from the config), its tokenizer (or UTF-8 bytes as token ids when the directory
has none), the checks a prompt must pass before it runs (not empty, within the model's
positions and vocabulary), and a batched prefill that gives each prompt's per-layer keys and
values. The weights load on the first prefill, so a run that finds everything stored loads none.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from kvstore.errors import ConfigError
from kvstore.kv.layout import KVLayout
from kvstore.kv.tensors import _layers_of

log = logging.getLogger(__name__)


def tokenizer_of(model_dir: str) -> Callable[[str], list[int]]:
    """The model's own tokenizer; without one, a prompt's UTF-8 bytes are its token ids."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return lambda text: tokenizer(text)["input_ids"]
    except (OSError, ValueError, TypeError):
        log.warning("no tokenizer in %s: using the text's UTF-8 bytes as token ids", model_dir)
        return lambda text: list(text.encode("utf-8"))


class HFModel:
    """A causal LM from a local directory: ``layout``, ``encode``, ``problem`` and ``prefill``."""

    def __init__(self, path: str, *, dtype: Any = None, chunk_size: int = 256, device: str | None = None) -> None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a transformers model from {path}: {exc}") from exc
        self.path = path
        dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        self.layout = KVLayout.from_hf_config(config, dtype=dtype, chunk_size=chunk_size)
        self.max_tokens: int | None = getattr(config, "max_position_embeddings", None)
        self.vocab_size: int | None = getattr(config, "vocab_size", None)
        self.encode = tokenizer_of(path)
        self._device = device
        self._model: Any = None

    @property
    def device(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def _loaded(self) -> Any:
        if self._model is None:
            import inspect

            from transformers import AutoModelForCausalLM

            model: Any = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True, dtype=self.layout.torch_dtype)
            self._model = model.to(self.device).eval()
            # Only the cache is wanted: skip the logits of every position but the last (B x T x vocab).
            self._keep = "logits_to_keep" in inspect.signature(self._model.forward).parameters
        return self._model

    def tokens_of(self, text: Any, tokens: Any) -> list[int]:
        """The prompt's token ids (``tokens`` as given, else ``text`` encoded); ValueError says what is wrong."""
        if tokens is None:
            if not isinstance(text, str):
                raise ValueError(f"the text is a {type(text).__name__}, not a string")
            return [int(t) for t in self.encode(text)]
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
            raise ValueError(f"bad tokens: a list of token ids expected, got a {type(tokens).__name__}")
        for i, t in enumerate(tokens):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):  # ints and numpy ints, not True/False
                raise ValueError(f"bad tokens: token {i} is {t!r}, not an integer")
        return [int(t) for t in tokens]

    def problem(self, tokens: Sequence[int]) -> str:
        """Why the model cannot run ``tokens`` ("" when it can)."""
        if not tokens:
            return "empty prompt: no tokens"
        if self.max_tokens and len(tokens) > self.max_tokens:
            return f"too long: {len(tokens)} tokens, the model takes at most {self.max_tokens} (max_position_embeddings)"
        if self.vocab_size:
            bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                return f"bad tokens: token id {bad} is outside the vocabulary (0-{self.vocab_size - 1})"
        return ""

    def prefill(self, batch: Sequence[Sequence[int]]) -> list[list[tuple[Any, Any]]]:
        """Each prompt's per-layer ``(keys, values)``, ``[1, H, T, D]`` on the CPU, from one padded forward pass.

        Prompts are right-padded and masked: under a causal mask a real token never sees the
        padding after it, and its position is its index, so its keys and values are the ones
        the prompt alone would give (up to the rounding of batched kernels).
        """
        import torch

        model = self._loaded()
        longest = max(len(t) for t in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(batch):
            ids[row, :len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
            mask[row, :len(tokens)] = 1
        extra = {"logits_to_keep": 1} if self._keep else {}
        with torch.inference_mode():
            out = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=True, **extra)
        cache = out["cache"] if "cache" in out else out.past_key_values  # transformers 5 renamed it
        layers = [(k.to("cpu"), v.to("cpu")) for k, v in _layers_of(cache)]  # one copy off a GPU
        return [[(k[row:row + 1, :, :len(tokens)], v[row:row + 1, :, :len(tokens)]) for k, v in layers]
                for row, tokens in enumerate(batch)]

"""How a chunk's layout (shapes, dtypes, memory format, token count) travels as object metadata.

The object's bytes stay exactly LMCache's raw chunk bytes, so LMCache's own S3 code can read
them; the layout goes beside them (``x-amz-meta-lmcache-*`` on S3), so a process that never
wrote the chunk can allocate the right buffer, short last chunks included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from lmcache.v1.memory_management import MemoryFormat, MemoryObj

from kvstore.naming import META_DTYPES, META_FMT, META_SHAPES, META_TOKENS

TOKEN_DIM = 2  # [2 or 1, layers, tokens, hidden] for KV_2LTD and KV_MLA_FMT


@dataclass(frozen=True)
class ChunkLayout:
    """What ``LocalCPUBackend.allocate`` needs to hold one chunk."""

    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    fmt: MemoryFormat

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * d.itemsize for s, d in zip(self.shapes, self.dtypes))

    @property
    def tokens(self) -> int:
        return int(self.shapes[0][TOKEN_DIM]) if len(self.shapes[0]) == 4 else 0

    def with_tokens(self, tokens: int) -> ChunkLayout:
        shapes = [torch.Size([*s[:TOKEN_DIM], tokens, *s[TOKEN_DIM + 1:]]) for s in self.shapes]
        return ChunkLayout(shapes, self.dtypes, self.fmt)

    def metadata(self) -> dict[str, str]:
        return {
            META_SHAPES: ";".join("x".join(str(int(n)) for n in s) for s in self.shapes),
            META_DTYPES: ";".join(str(d).removeprefix("torch.") for d in self.dtypes),
            META_FMT: self.fmt.name,
            META_TOKENS: str(self.tokens),
        }


def layout_of(memory_obj: MemoryObj) -> ChunkLayout:
    """The layout of a chunk LMCache hands over for storing (its true, possibly short, shape)."""
    return ChunkLayout(list(memory_obj.get_shapes()), list(memory_obj.get_dtypes()), memory_obj.get_memory_format())


def layout_from_metadata(metadata: Mapping[str, str]) -> ChunkLayout | None:
    """The layout written by ``ChunkLayout.metadata``; None when absent or unreadable."""
    try:
        shapes = [torch.Size(int(n) for n in s.split("x")) for s in metadata[META_SHAPES].split(";")]
        dtypes = [getattr(torch, name) for name in metadata[META_DTYPES].split(";")]
        fmt = MemoryFormat[metadata[META_FMT]]
    except (KeyError, ValueError, AttributeError):
        return None
    if len(shapes) != len(dtypes) or not all(isinstance(d, torch.dtype) for d in dtypes):
        return None
    return ChunkLayout(shapes, dtypes, fmt)


def layout_for(size: int, metadata: Mapping[str, str], full: ChunkLayout) -> ChunkLayout | None:
    """The layout of a stored object: from its metadata, else inferred from its size.

    Objects written by LMCache's own S3 connector carry no metadata and are full chunks; a size
    that is a whole number of tokens of this model's layout also reads back.
    """
    layout = layout_from_metadata(metadata)
    if layout is not None:
        return layout if layout.nbytes == size else None
    if size == full.nbytes:
        return full
    per_token = full.nbytes // max(full.tokens, 1)
    if full.tokens and 0 < size < full.nbytes and size % per_token == 0:
        return full.with_tokens(size // per_token)
    return None

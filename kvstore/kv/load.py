"""``load`` and ``verify``: read dumped chunks back, or check them, for a token sequence."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from kvstore.errors import IntegrityError
from kvstore.kv.concurrency import parallel_map
from kvstore.kv.keys import ChunkKey, chunk_keys
from kvstore.kv.layout import KVLayout

Progress = Callable[[int], None]  # called with how many more chunks were looked at


def _keys(store: Any, tokens: Sequence[int] | Any, model: str, layout: KVLayout, world_size: int, worker_id: int,
          save_unfull_chunk: bool, engine_config: Any) -> list[ChunkKey]:
    return chunk_keys(tokens, model=model, layout=layout, world_size=world_size, worker_id=worker_id,
                      save_unfull_chunk=save_unfull_chunk, key_layout=store.config.lmcache.key_layout, engine_config=engine_config)


def load_chunks(
    store: Any, tokens: Sequence[int] | Any, *, model: str, layout: KVLayout, world_size: int = 1, worker_id: int = 0,
    save_unfull_chunk: bool = True, engine_config: Any = None,
) -> list[Any]:
    """The longest cached prefix as LMCache chunk tensors, in order (empty on a miss at the first chunk).

    Every chunk is read with ``get_into`` straight into its own slice of one preallocated
    buffer: no copies. Raises ``IntegrityError`` when a chunk has the wrong size.
    """
    import torch

    chunks = _keys(store, tokens, model, layout, world_size, worker_id, save_unfull_chunk, engine_config)
    buffer = torch.empty(sum(c.num_tokens for c in chunks) * layout.token_bytes() // layout.item_size,
                         dtype=layout.torch_dtype)
    views, offset = [], 0
    for c in chunks:
        numel = layout.chunk_bytes(c.num_tokens) // layout.item_size
        views.append(buffer[offset:offset + numel].view(layout.chunk_shape(c.num_tokens)))
        offset += numel
    sizes = store.get_into_many([c.name for c in chunks], views)
    out = []
    for c, view, size in zip(chunks, views, sizes):
        if size is None:
            break
        if size != layout.chunk_bytes(c.num_tokens):
            raise IntegrityError(f"chunk {c.name!r} holds {size} bytes, {layout.chunk_bytes(c.num_tokens)} expected "
                                 f"for {c.num_tokens} tokens of {layout}")
        out.append(view)
    return out


def load(store: Any, tokens: Sequence[int] | Any, *, model: str, layout: KVLayout, **kwargs: Any) -> Any:
    """The longest cached prefix of ``tokens`` as one ``[2, L, T, H*D]`` tensor (``[1, L, T, D]`` for MLA), or None.

    Chunks are stored chunk-major, so joining them along the token axis costs one copy; use
    ``load_chunks`` to get them without it.
    """
    import torch

    chunks = load_chunks(store, tokens, model=model, layout=layout, **kwargs)
    if not chunks:
        return None
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)


@dataclass(frozen=True)
class ChunkCheck:
    """One chunk's state: ``ok``, ``missing``, ``wrong-size`` or ``corrupt`` (checksum mismatch)."""

    start: int
    end: int
    name: str
    status: str
    size: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class VerifyReport:
    chunks: list[ChunkCheck]

    @property
    def ok(self) -> bool:
        return all(c.status == "ok" for c in self.chunks)

    @property
    def cached_tokens(self) -> int:
        """Tokens covered by the leading run of good chunks (what an engine would hit)."""
        end = 0
        for c in self.chunks:
            if c.status != "ok":
                break
            end = c.end
        return end

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.chunks:
            out[c.status] = out.get(c.status, 0) + 1
        return out


def verify(
    store: Any, tokens: Sequence[int] | Any, *, model: str, layout: KVLayout, world_size: int = 1, worker_id: int = 0,
    save_unfull_chunk: bool = True, read: bool = True, engine_config: Any = None, progress: Progress | None = None,
) -> VerifyReport:
    """Check every chunk of ``tokens``: present, of the size its token count needs, and (``read``)
    matching the checksum stored with it, when there is one.

    A chunk the store reports as damaged is ``corrupt`` and the check goes on with the rest;
    ``progress`` is called with the number of chunks looked at (stat, then read).
    """
    chunks = _keys(store, tokens, model, layout, world_size, worker_id, save_unfull_chunk, engine_config)
    tick = progress or (lambda n: None)

    def look(c: ChunkKey) -> Any:
        try:
            return store.stat(c.name)
        except IntegrityError as exc:
            return exc
        finally:
            tick(1)

    infos = parallel_map(store, look, chunks)
    checks = []
    to_read = []
    for c, info in zip(chunks, infos):
        expected = layout.chunk_bytes(c.num_tokens)
        if isinstance(info, IntegrityError):
            checks.append(ChunkCheck(c.start, c.end, c.name, "corrupt", None, str(info)))
        elif info is None:
            checks.append(ChunkCheck(c.start, c.end, c.name, "missing"))
        elif info.size != expected:
            checks.append(ChunkCheck(c.start, c.end, c.name, "wrong-size", info.size, f"{expected} bytes expected"))
        else:
            checks.append(ChunkCheck(c.start, c.end, c.name, "ok", info.size))
            to_read.append(len(checks) - 1)
    if read:
        def check(index: int) -> ChunkCheck:
            c = checks[index]
            try:
                store.get_into(c.name, bytearray(cast(int, c.size)))  # an "ok" check has its size
            except IntegrityError as exc:
                return ChunkCheck(c.start, c.end, c.name, "corrupt", c.size, str(exc))
            finally:
                tick(1)
            return c

        for index, result in zip(to_read, parallel_map(store, check, to_read)):
            checks[index] = result
    return VerifyReport(checks)

"""``dump_corpus``: dump the KV caches of a whole corpus of prompts, in one process or on Ray.

A batch of prompts at a time: tokenize and check each prompt (one that cannot run is reported
with its reason and the run goes on), compute every chunk key, check the whole batch's chunks
with one batched existence check, run the model only over prompts that still miss a chunk
(padded forward passes of at most ``max_batch_tokens``), and write each prompt's missing chunks
with ``write_chunks``. A chunk shared by several prompts of a batch is written by the first;
with another writer at work (a Ray actor, a second run) conditional puts make sure it is
written once. A rerun writes only what is missing, and loads no weights when nothing is.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kvstore.errors import AuthError, BucketNotFound, ConfigError, KVStoreError
from kvstore.kv.concurrency import parallel_map
from kvstore.kv.corpus_input import Corpus, Fields, Prompt
from kvstore.kv.corpus_model import HFModel
from kvstore.kv.corpus_report import CorpusReport, Manifest, PromptResult, Tally
from kvstore.kv.dump import write_chunks
from kvstore.kv.keys import ChunkKey, chunk_keys

DEFAULT_CHUNK_SIZE = 256
Progress = Callable[[list[PromptResult]], None]  # called with each finished batch's results
_FATAL = (AuthError, BucketNotFound, ConfigError)  # no prompt can succeed after these: stop the run
_Todo = tuple[int, list[int], list[ChunkKey]]  # a prompt to dump: its place in the batch, tokens, chunks


@dataclass(frozen=True)
class CorpusJob:
    """Everything a worker needs to dump prompts (picklable: Ray ships it to every actor)."""

    url: str | None  # None: the kvstore_url of extra_config
    corpus: Corpus
    model: str
    hf_model: str
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    save_unfull_chunk: bool = True
    engine_config: Any = None
    dtype: str | None = None
    world_size: int = 1
    worker_id: int = 0
    max_batch_tokens: int = 8192
    device: str | None = None


class PromptWriter:
    """Dumps batches of prompts into one store with one model, both opened once."""

    def __init__(self, job: CorpusJob, store: Any = None) -> None:
        import kvstore

        self.job = job
        self.model = HFModel(job.hf_model, dtype=job.dtype, chunk_size=job.chunk_size, device=job.device)
        self.store = store if store is not None else kvstore.open(job.url, dict(job.extra_config))
        self._owns_store = store is None
        # Prompts written at once, and chunk copies per prompt: together no more than one dump holds.
        self._parallel = max(1, min(8, self.store.config.max_inflight // 4))
        self._batch_chunks = max(1, 2 * self.store.config.max_inflight // self._parallel)

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def run(self, prompts: list[Prompt]) -> list[PromptResult]:
        """Dump ``prompts``; one result each, in order."""
        results: list[PromptResult | None] = [None] * len(prompts)
        todo: list[_Todo] = []
        for i, prompt in enumerate(prompts):
            try:
                tokens = self.model.tokens_of(prompt.text, prompt.tokens)
            except ValueError as exc:
                results[i] = PromptResult(prompt.id, 0, error=str(exc))
                continue
            reason = self.model.problem(tokens)
            if reason:
                results[i] = PromptResult(prompt.id, len(tokens), error=reason)
                continue
            todo.append((i, tokens, self._keys(tokens)))
        present = self._present({c.name for _, _, keys in todo for c in keys})
        claimed: set[str] = set()  # chunks an earlier prompt of this batch writes
        needing: list[_Todo] = []
        for i, tokens, keys in todo:
            if all(present[c.name] for c in keys):
                results[i] = PromptResult(prompts[i].id, len(tokens), skipped=len(keys))
            else:
                needing.append((i, tokens, keys))
        for group in self._groups(needing):
            for (i, _, _), result in zip(group, self._dump_group(prompts, group, present, claimed)):
                results[i] = result
        return [r for r in results if r is not None]

    def _keys(self, tokens: list[int]) -> list[ChunkKey]:
        job = self.job
        return chunk_keys(tokens, model=job.model, layout=self.model.layout, world_size=job.world_size,
                          worker_id=job.worker_id, save_unfull_chunk=job.save_unfull_chunk,
                          key_layout=self.store.config.lmcache.key_layout, engine_config=job.engine_config)

    def _present(self, names: set[str]) -> dict[str, bool]:
        """One batched existence check for a whole batch of prompts."""
        ordered = sorted(names)
        try:
            found = self.store.exists_many(ordered)
        except BucketNotFound:
            found = [False] * len(ordered)  # a file store's root is made by the first put
        return dict(zip(ordered, found))

    def _groups(self, items: list[_Todo]) -> Iterator[list[_Todo]]:
        """Consecutive prompts whose padded forward pass stays within ``max_batch_tokens``."""
        group: list[_Todo] = []
        for item in items:
            longest = max([len(t) for _, t, _ in group] + [len(item[1])])
            if group and longest * (len(group) + 1) > self.job.max_batch_tokens:
                yield group
                group = []
            group.append(item)
        if group:
            yield group

    def _dump_group(self, prompts: list[Prompt], group: list[_Todo], present: dict[str, bool],
                    claimed: set[str]) -> list[PromptResult]:
        started = time.perf_counter()
        kvs = self._prefill([tokens for _, tokens, _ in group])
        share = (time.perf_counter() - started) / len(group)
        jobs = []
        for (i, tokens, keys), kv in zip(group, kvs):
            if isinstance(kv, str):
                continue
            jobs.append((i, tokens, keys, kv, [present[c.name] or c.name in claimed for c in keys]))
            claimed.update(c.name for c in keys)
        done = dict(zip((j[0] for j in jobs), parallel_map(self.store, self._write, jobs)))
        out = []
        for (i, tokens, _), kv in zip(group, kvs):
            result = PromptResult(prompts[i].id, len(tokens), error=kv) if isinstance(kv, str) else done[i]
            out.append(replace(result, id=prompts[i].id, seconds=round(result.seconds + share, 6)))
        return out

    def _write(self, job: tuple[int, list[int], list[ChunkKey], Any, list[bool]]) -> PromptResult:
        _, tokens, keys, kv, present = job
        try:
            report = write_chunks(self.store, keys, kv, self.model.layout, present=present,
                                  batch_chunks=self._batch_chunks, if_absent=True)
        except _FATAL:
            raise
        except KVStoreError as exc:  # this prompt's chunks could not all be stored: a rerun writes the rest
            return PromptResult("", len(tokens), error=f"store: {type(exc).__name__}: {exc}")
        return PromptResult("", len(tokens), report.written, report.skipped, report.bytes, report.seconds)

    def _prefill(self, batch: list[list[int]]) -> list[Any]:
        """Each prompt's KV cache, or why the model failed on it (a failed batch is run a prompt at a time)."""
        try:
            return self.model.prefill(batch)
        except Exception as exc:  # the model raises what it likes; the run goes on without this prompt
            if len(batch) == 1:
                return [f"model: {type(exc).__name__}: {exc}"]
        return [kv for tokens in batch for kv in self._prefill([tokens])]


def resolve_key_settings(chunk_size: int | None, save_unfull_chunk: bool | None, engine_config: Any) -> tuple[int, bool]:
    """Explicit values, else the LMCache config's, else LMCache's chunk size and unfull chunks kept."""
    if chunk_size is None:
        chunk_size = int(engine_config.chunk_size) if engine_config is not None else DEFAULT_CHUNK_SIZE
    if save_unfull_chunk is None:
        save_unfull_chunk = bool(engine_config.save_unfull_chunk) if engine_config is not None else True
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be positive, got {chunk_size}")
    return chunk_size, save_unfull_chunk


def dump_corpus(
    url: str | None, corpus: str | os.PathLike[str], *, model: str, hf_model: str, extra_config: Mapping[str, Any] | None = None,
    manifest: str | os.PathLike[str] | None = None, text_field: str = "text", tokens_field: str = "tokens",
    id_field: str = "id", chunk_size: int | None = None, save_unfull_chunk: bool | None = None,
    engine_config: Any = None, dtype: str | None = None, world_size: int = 1, worker_id: int = 0,
    batch_size: int = 16, max_batch_tokens: int = 8192, device: str | None = None, ray_address: str | None = None,
    actors: int | None = None, actor_cpus: float = 1.0, progress: Progress | None = None,
) -> CorpusReport:
    """Dump the KV cache of every prompt of ``corpus`` (JSONL, Parquet, a directory of text files
    or a saved ``datasets`` dataset) computed by the transformers model in ``hf_model`` into
    the store at ``url``; ``model`` is the name LMCache sees.

    ``chunk_size`` and ``save_unfull_chunk`` default to ``engine_config``'s (the serving
    engines' ``LMCacheEngineConfig``). ``batch_size`` prompts are read and checked at a time;
    forward passes hold at most ``max_batch_tokens`` padded tokens. ``ray_address`` (``""``:
    ``ray.init()``'s default, ``"auto"``, ``"ray://host:10001"``) runs it on Ray Data with
    ``actors`` actors (default: one per GPU, else one per ``actor_cpus`` CPUs but one). One
    ``PromptResult`` per prompt goes to ``manifest`` (JSON lines, or Parquet for ``.parquet``).
    """
    chunk_size, save_unfull_chunk = resolve_key_settings(chunk_size, save_unfull_chunk, engine_config)
    if batch_size < 1 or max_batch_tokens < 1:
        raise ConfigError(f"batch_size and max_batch_tokens must be positive, got {batch_size} and {max_batch_tokens}")
    job = CorpusJob(url, Corpus.open(corpus, Fields(text_field, tokens_field, id_field)), model, hf_model,
                    dict(extra_config or {}), chunk_size, save_unfull_chunk, engine_config, dtype, world_size,
                    worker_id, max_batch_tokens, device)
    started = time.perf_counter()
    tally = Tally()
    with Manifest(manifest) as out:
        if ray_address is None:
            batches = _run_local(job, batch_size)
        else:
            from kvstore.kv.corpus_ray import run_on_ray

            batches = run_on_ray(job, ray_address, batch_size=batch_size, actors=actors, actor_cpus=actor_cpus)
        for results in batches:
            out.write(results)
            tally.add(results)
            if progress:
                progress(results)
    return tally.report(time.perf_counter() - started, out.path)


def _run_local(job: CorpusJob, batch_size: int) -> Iterator[list[PromptResult]]:
    writer = PromptWriter(job)
    try:
        prompts = iter(job.corpus)
        while batch := list(itertools.islice(prompts, batch_size)):
            yield writer.run(batch)
    finally:
        writer.close()

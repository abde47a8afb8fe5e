"""The Ray path of ``dump_corpus``: Ray Data reads the corpus, a pool of actors dumps it.

Each actor (a callable class) opens its own store from the URL and extra_config and loads the
model once, on a GPU when the cluster has them; ``map_batches`` hands it batches of rows and it
writes their chunks straight to the store, returning one manifest row per prompt to the driver.
Ray restarts an actor that dies and retries its batch (``max_restarts`` / ``max_task_retries``);
puts are atomic and keyed by content, so the retry skips what the dead attempt stored and nothing
is written twice or left half-written. Needs ``pip install 'kvcache-store[ray]'``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

from kvstore.errors import ConfigError
from kvstore.kv.corpus import CorpusJob, PromptWriter
from kvstore.kv.corpus_report import PromptResult, from_arrow, to_arrow

# Test hook: the path of a file holding N. The first actor to claim it (by renaming it) exits
# abruptly after N batches, in the middle of writing the next one, as a node lost mid-job would.
EXIT_HOOK_ENV = "KVSTORE_TEST_CORPUS_ACTOR_EXIT"
FATAL = "kvstore_fatal"  # a column of the actors' output only: the row says why the run must stop


class DumpActor:
    """One Ray Data actor: a store and a model, opened once, dumping batch after batch."""

    def __init__(self, job: CorpusJob) -> None:
        self.job = job
        self.writer = PromptWriter(job)
        self.batches = 0
        self._exit_after = _claim_exit_hook()

    def __call__(self, table: Any) -> Any:
        try:
            prompts = [self.job.corpus.prompt_of(row, self._where(row)) for row in table.to_pylist()]
        except ConfigError as exc:
            # Bad input: Ray would hand the driver a traceback without the error itself, so say it in a row.
            return _with_fatal(to_arrow([PromptResult("", 0, error=str(exc))]), True)
        if self._exit_after is not None and self.batches >= self._exit_after:
            self._die_while_writing()
        self.batches += 1
        return _with_fatal(to_arrow(self.writer.run(prompts)), False)

    def _where(self, row: dict[str, Any]) -> str:
        """A row as an error names it: Ray's readers know no line numbers, so by its id when it has one."""
        corpus = self.job.corpus
        given = row.get(corpus.fields.id)
        return f"{corpus.path}: the row with {corpus.fields.id} {given!r}" if given is not None else f"{corpus.path}: a row"

    def _die_while_writing(self) -> None:
        store = self.writer.store
        real_put = store.put

        def put(*args: Any, **kwargs: Any) -> None:
            real_put(*args, **kwargs)
            os._exit(1)  # after one chunk of this batch landed, with others maybe in flight

        store.put = put  # type: ignore[method-assign]


def _claim_exit_hook() -> int | None:
    path = os.environ.get(EXIT_HOOK_ENV)
    if not path:
        return None
    claimed = f"{path}.claimed-{os.getpid()}"
    try:
        os.rename(path, claimed)  # atomic: exactly one actor of the whole run gets it
    except OSError:
        return None
    with open(claimed) as f:
        return int(f.read().strip() or 0)


def run_on_ray(job: CorpusJob, address: str, *, batch_size: int, actors: int | None,
               actor_cpus: float) -> Iterator[list[PromptResult]]:
    """Run ``job`` on the Ray cluster at ``address`` ("" for ``ray.init()``'s default); results per batch."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--ray needs Ray Data: pip install 'kvcache-store[ray]'") from exc
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or None, log_to_driver=False)
    try:
        api: Any = ray  # parts of Ray's API carry no annotations
        resources: dict[str, float] = api.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = resources.get("CPU", 1)
        if actors is None:
            actors = gpus or max(1, int((cpus - 1) / actor_cpus))
        if actors * actor_cpus > cpus - 1:  # Ray Data would wait for ever for a CPU to read the corpus with
            raise ConfigError(f"{actors} actors of {actor_cpus:g} CPUs leave no CPU to read the corpus with on a "
                              f"cluster of {cpus:g}: ask for fewer actors (--actors) or CPUs each (--actor-cpus)")
        with warnings.catch_warnings():
            # Ray 2.60 deprecates passing actor options as extra keywords but has no named ones for
            # these yet; they are Ray Data's defaults there, and not on every release since 2.9.
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            dataset = job.corpus.ray_dataset().map_batches(
                DumpActor, fn_constructor_kwargs={"job": job}, batch_size=batch_size, batch_format="pyarrow",
                concurrency=actors, num_gpus=1 if gpus else 0, num_cpus=actor_cpus,
                # An actor that dies is restarted and its batches retried, as often as it takes.
                max_restarts=-1, max_task_retries=-1)
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            results = from_arrow(table.drop_columns([FATAL]))
            for result, fatal in zip(results, table.column(FATAL).to_pylist()):
                if fatal:  # bad input found on an actor: the same clear error as in one process
                    raise ConfigError(str(result.error))
            yield results
    finally:
        if started_here:
            ray.shutdown()



def _with_fatal(table: Any, fatal: bool) -> Any:
    import pyarrow as pa

    return table.append_column(FATAL, pa.array([fatal] * table.num_rows, pa.bool_()))

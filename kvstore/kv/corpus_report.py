"""What a corpus dump reports: one ``PromptResult`` per prompt (the manifest's rows) and a ``CorpusReport``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from kvstore.errors import ConfigError

MAX_FAILURES = 100  # failed prompts kept in the report; the manifest has every one


@dataclass(frozen=True)
class PromptResult:
    """One prompt: its id, token count, chunks written and skipped (already stored), bytes written,
    seconds (its share of its batch's forward pass plus its writes) and why it failed (None: it did not)."""

    id: str
    tokens: int
    written: int = 0
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None


COLUMNS = tuple(f.name for f in fields(PromptResult))


def arrow_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("tokens", pa.int64()), ("written", pa.int64()), ("skipped", pa.int64()),
                      ("bytes", pa.int64()), ("seconds", pa.float64()), ("error", pa.string())])


def to_arrow(results: Iterable[PromptResult]) -> Any:
    """Results as a pyarrow Table (what a Ray actor hands back)."""
    import pyarrow as pa

    rows = list(results)
    return pa.table({c: [getattr(r, c) for r in rows] for c in COLUMNS}, schema=arrow_schema())


def from_arrow(table: Any) -> list[PromptResult]:
    return [PromptResult(**row) for row in table.to_pylist()]


@dataclass(frozen=True)
class CorpusReport:
    """A whole run: prompts (``failed`` of them failed), their tokens, chunks written and skipped,
    bytes written, wall-clock seconds, the first failures ``(id, error)`` and the manifest's path."""

    prompts: int
    failed: int
    tokens: int
    written: int
    skipped: int
    bytes: int
    seconds: float
    failures: tuple[tuple[str, str], ...] = ()
    manifest: str | None = None

    @property
    def chunks(self) -> int:
        return self.written + self.skipped

    @property
    def gib(self) -> float:
        return self.bytes / 2**30

    def _rate(self, n: float) -> float:
        return n / self.seconds if self.seconds > 0 else 0.0

    @property
    def gib_per_s(self) -> float:
        return self._rate(self.gib)

    @property
    def prompts_per_s(self) -> float:
        return self._rate(self.prompts)

    @property
    def tokens_per_s(self) -> float:
        return self._rate(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failures": [{"id": i, "error": e} for i, e in self.failures], "chunks": self.chunks,
                "gib": self.gib, "gib_per_s": self.gib_per_s, "prompts_per_s": self.prompts_per_s,
                "tokens_per_s": self.tokens_per_s}


class Tally:
    """Adds results up into a ``CorpusReport``."""

    def __init__(self) -> None:
        self.prompts = self.failed = self.tokens = self.written = self.skipped = self.bytes = 0
        self.failures: list[tuple[str, str]] = []

    def add(self, results: Iterable[PromptResult]) -> None:
        for r in results:
            self.prompts += 1
            self.written += r.written
            self.skipped += r.skipped
            self.bytes += r.bytes
            if r.error is None:
                self.tokens += r.tokens
                continue
            self.failed += 1
            if len(self.failures) < MAX_FAILURES:
                self.failures.append((r.id, r.error))

    def report(self, seconds: float, manifest: str | None) -> CorpusReport:
        return CorpusReport(self.prompts, self.failed, self.tokens, self.written, self.skipped, self.bytes, seconds,
                            tuple(self.failures), manifest)


class Manifest:
    """The manifest file: JSON lines, or Parquet when the path ends ``.parquet``; written as results come.

    ``path=None`` writes nothing. JSON lines are flushed after each batch, so a run that is
    stopped leaves the rows of what it finished.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else os.fspath(path)
        self._file: Any = None
        self._parquet: Any = None
        if self.path is None:
            return
        try:
            if self.path.lower().endswith(".parquet"):
                import pyarrow.parquet as pq

                self._parquet = pq.ParquetWriter(self.path, arrow_schema())
            else:
                self._file = open(self.path, "w", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write the manifest {self.path}: {exc}") from exc

    def write(self, results: list[PromptResult]) -> None:
        if self._parquet is not None and results:
            self._parquet.write_table(to_arrow(results))
        elif self._file is not None:
            self._file.writelines(json.dumps(asdict(r)) + "\n" for r in results)
            self._file.flush()

    def close(self) -> None:
        for handle in (self._file, self._parquet):
            if handle is not None:
                handle.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_manifest(path: str | os.PathLike[str]) -> list[PromptResult]:
    """The rows of a manifest ``dump_corpus`` wrote."""
    path = os.fspath(path)
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return from_arrow(pq.read_table(path))
    with open(path, encoding="utf-8") as f:
        return [PromptResult(**json.loads(line)) for line in f if line.strip()]

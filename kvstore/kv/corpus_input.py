"""The prompts of a corpus: JSONL, Parquet, a directory of text files, or a saved ``datasets`` dataset.

``Corpus.open`` tells the format from the path and checks what can be checked up front (the
file exists, a Parquet or ``datasets`` schema has the named fields). Iterating a ``Corpus``
streams its prompts (never the whole corpus at once); ``ray_dataset`` reads the same input as
a Ray dataset whose rows ``prompt_of`` turns into the same prompts, so both paths agree on
ids and on what is an error.

A row's tokens win over its text when it has both. Without an id field a prompt's id is
``sha1:`` and 16 hex digits of its content, the same on every run and on either path; a text
file's id is its path under the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvstore.errors import ConfigError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
_READ_BATCH = 1024  # rows per Parquet / datasets read: bounded memory, few calls


@dataclass(frozen=True)
class Fields:
    """The names of the fields (columns) a prompt is read from."""

    text: str = "text"
    tokens: str = "tokens"
    id: str = "id"


@dataclass(frozen=True)
class Prompt:
    """One prompt as read: its id and its text or its token ids (checked when it is tokenized)."""

    id: str
    text: Any = None
    tokens: Any = None


def content_id(value: Any) -> str:
    """A stable id for a prompt without one: a digest of its text or tokens."""
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else json.dumps(value, default=str).encode()
    return "sha1:" + hashlib.sha1(data).hexdigest()[:16]


def _is_hf_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


@dataclass(frozen=True)
class Corpus:
    """Where the prompts come from: ``path``, its ``kind`` (jsonl, parquet, text, hf) and the field names."""

    path: str
    kind: str
    fields: Fields = field(default_factory=Fields)

    @classmethod
    def open(cls, path: str | os.PathLike[str], fields: Fields | None = None) -> Corpus:
        """Tell the input's format from ``path`` and check its fields; ConfigError naming the file otherwise."""
        path = os.path.abspath(os.fspath(path))
        fields = fields or Fields()
        for name in ("text", "tokens", "id"):
            if not getattr(fields, name):
                raise ConfigError(f"the {name} field name is empty")
        if os.path.isdir(path):
            kind = "hf" if _is_hf_dataset(path) else "text"
        elif not os.path.exists(path):
            raise ConfigError(f"corpus {path}: no such file or directory")
        elif path.lower().endswith(JSONL_SUFFIXES):
            kind = "jsonl"
        elif path.lower().endswith(PARQUET_SUFFIXES):
            kind = "parquet"
        else:
            raise ConfigError(f"corpus {path}: not a JSONL ({', '.join(JSONL_SUFFIXES)}) or Parquet "
                              f"({', '.join(PARQUET_SUFFIXES)}) file, nor a directory of text files or a saved "
                              "datasets dataset")
        corpus = cls(path, kind, fields)
        if kind in ("parquet", "hf"):
            corpus._check_columns(corpus._columns())
        return corpus

    # -- rows to prompts ---------------------------------------------------------------------
    def prompt_of(self, row: Mapping[str, Any], where: str) -> Prompt:
        """The prompt in ``row``; a row with neither field is a ConfigError naming ``where``."""
        if self.kind == "text" and "bytes" in row:  # a Ray row of read_binary_files: the file itself
            name = os.path.relpath(os.path.join(os.sep, str(row["path"]).lstrip(os.sep)), self.path)
            return Prompt(name.replace(os.sep, "/"), text=self._decode(row["bytes"], name))
        f = self.fields
        tokens, text = row.get(f.tokens), row.get(f.text)
        if tokens is None and text is None:
            have = ", ".join(repr(k) for k, v in row.items() if v is not None) or "nothing"
            raise ConfigError(f"{where}: neither a {f.text!r} nor a {f.tokens!r} field (it has {have}); "
                              "name them with --text-field / --tokens-field")
        value: Any = text if tokens is None else tokens
        if hasattr(value, "tolist"):  # numpy arrays from Ray / Arrow
            value = value.tolist()
        given = row.get(f.id)
        return Prompt(content_id(value) if given is None else str(given),
                      text=value if tokens is None else None, tokens=None if tokens is None else value)

    def _decode(self, data: bytes, name: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{os.path.join(self.path, name)}: not UTF-8 text: {exc}") from exc

    # -- streaming ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Prompt]:
        return {"jsonl": self._jsonl, "parquet": self._parquet, "text": self._text, "hf": self._hf}[self.kind]()

    def _jsonl(self) -> Iterator[Prompt]:
        try:
            f = open(self.path, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc}") from exc
        with f:
            line_no = 0
            try:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{self.path}:{line_no}"
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        raise ConfigError(f"{where}: not JSON: {exc}") from exc
                    if not isinstance(row, dict):
                        raise ConfigError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
                    yield self.prompt_of(row, where)
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{self.path}:{line_no + 1}: cannot read: {exc}") from exc

    def _rows(self, batches: Iterator[Any]) -> Iterator[Prompt]:
        row_no = 0
        for batch in batches:
            for row in batch:
                yield self.prompt_of(row, f"{self.path}: row {row_no}")
                row_no += 1

    def _parquet(self) -> Iterator[Prompt]:
        import pyarrow.parquet as pq

        try:
            columns = self._wanted(pq.ParquetFile(self.path).schema_arrow.names)
            batches = (b.to_pylist() for b in pq.ParquetFile(self.path).iter_batches(_READ_BATCH, columns=columns))
            yield from self._rows(batches)
        except OSError as exc:  # pyarrow's ArrowInvalid is an OSError too: a damaged file
            raise ConfigError(f"cannot read {self.path}: {exc}") from exc

    def _hf(self) -> Iterator[Prompt]:
        dataset = self._hf_dataset()
        dataset = dataset.select_columns(self._wanted(dataset.column_names))
        batches = (_rows_of_columns(b) for b in dataset.iter(batch_size=_READ_BATCH))
        yield from self._rows(batches)

    def _text(self) -> Iterator[Prompt]:
        for name in _text_files(self.path):
            full = os.path.join(self.path, name)
            try:
                with open(full, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise ConfigError(f"cannot read {full}: {exc}") from exc
            yield Prompt(name.replace(os.sep, "/"), text=self._decode(data, name))

    # -- schemas -----------------------------------------------------------------------------
    def _columns(self) -> list[str]:
        if self.kind == "hf":
            return list(self._hf_dataset().column_names)
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(self.path).names)
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc}") from exc

    def _check_columns(self, columns: list[str]) -> None:
        if self.fields.text not in columns and self.fields.tokens not in columns:
            raise ConfigError(f"{self.path}: neither a {self.fields.text!r} nor a {self.fields.tokens!r} column "
                              f"(it has {', '.join(map(repr, columns)) or 'none'}); name them with --text-field / "
                              "--tokens-field")

    def _wanted(self, columns: list[str]) -> list[str]:
        return [c for c in (self.fields.id, self.fields.text, self.fields.tokens) if c in columns]

    def _hf_dataset(self) -> Any:
        try:
            import datasets
        except ImportError as exc:
            raise ConfigError(f"{self.path} is a saved Hugging Face dataset: reading it needs the 'datasets' "
                              "package: pip install datasets") from exc
        if os.path.isfile(os.path.join(self.path, "dataset_dict.json")):
            splits = sorted(e.name for e in os.scandir(self.path) if e.is_dir())
            raise ConfigError(f"{self.path} holds several splits ({', '.join(splits)}): give one of their directories")
        try:
            return datasets.load_from_disk(self.path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the dataset in {self.path}: {exc}") from exc

    # -- Ray ---------------------------------------------------------------------------------
    def ray_dataset(self) -> Any:
        """The corpus as a Ray dataset; each row goes through ``prompt_of`` on the actor that dumps it."""
        import ray.data

        if self.kind == "jsonl":
            return ray.data.read_json(self.path, file_extensions=None)
        if self.kind == "parquet":
            return ray.data.read_parquet(self.path, columns=self._wanted(self._columns()), file_extensions=None)
        if self.kind == "text":
            return ray.data.read_binary_files([os.path.join(self.path, n) for n in _text_files(self.path)],
                                              include_paths=True)
        dataset = self._hf_dataset()
        return ray.data.from_huggingface(dataset.select_columns(self._wanted(dataset.column_names)))


def _rows_of_columns(batch: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]


def _text_files(root: str) -> list[str]:
    """Every file under ``root`` (hidden ones left out), as paths relative to it, sorted."""
    out: list[str] = []
    for parent, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.relpath(os.path.join(parent, f), root) for f in files if not f.startswith("."))
    if not out:
        raise ConfigError(f"corpus {root}: the directory holds no files")
    return sorted(out)

"""``dump_corpus`` and ``kvstore dump --corpus``: a corpus of prompts with shared prefixes, dumped by a
tiny random-weight Llama in one process and on a local Ray cluster, then hit by a real LMCache engine."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lmcache")
pytest.importorskip("transformers")
pytest.importorskip("pyarrow")

import kvstore  # noqa: E402
from kvstore.cli.common import EXIT_FAILED  # noqa: E402
from kvstore.cli.main import main  # noqa: E402
from kvstore.errors import ConfigError  # noqa: E402
from kvstore.kv import KVLayout, chunk_keys, dump_corpus, load, scan  # noqa: E402
from kvstore.kv.corpus_report import read_manifest  # noqa: E402

pytestmark = pytest.mark.lmcache

MODEL = "org/tiny-corpus"
CHUNK = 16
MAX_POSITIONS = 128
LAYOUT = KVLayout(2, 2, 16, "float32", chunk_size=CHUNK)  # the model below: 2 layers, 2 KV heads of 64 / 4


def _system(i: int) -> str:
    return f"System prompt {i}: answer briefly.".ljust(3 * CHUNK, ".")  # three whole chunks, shared by its questions


def corpus_rows(systems: int = 10, questions: int = 20) -> list[dict]:
    """``systems`` x ``questions`` prompts (UTF-8 bytes are the token ids); every third one given as tokens."""
    rows = []
    for s in range(systems):
        for q in range(questions):
            text = _system(s) + f" Question {q}: what is {q} + {s}?" + "!" * (q % 7)
            rows.append({"id": f"s{s}-q{q}", "tokens": list(text.encode())} if q % 3 == 0 else
                        {"id": f"s{s}-q{q}", "text": text})
    return rows


def _tokens(row: dict) -> list[int]:
    return row["tokens"] if "tokens" in row else list(row["text"].encode())


def expected_names(rows: list[dict], *, save_unfull_chunk: bool = True) -> tuple[set[str], int]:
    """The distinct chunk names of all prompts, and how many chunks they have counted per prompt."""
    names, total = set(), 0
    for row in rows:
        keys = chunk_keys(_tokens(row), model=MODEL, layout=LAYOUT, save_unfull_chunk=save_unfull_chunk)
        names.update(c.name for c in keys)
        total += len(keys)
    return names, total


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(str(path))
    return str(path)


def lmcache_yaml(path, url: str, extra: dict | None = None) -> str:
    """The serving engines' LMCache config: chunks of 16, short last chunks not saved, the kvstore plugin."""
    lines = [f"chunk_size: {CHUNK}", "save_unfull_chunk: False", "local_cpu: True", "max_local_cpu_size: 0.05",
             'remote_storage_plugins: ["kvstore"]', "extra_config:",
             "  remote_storage_plugin.kvstore.module_path: kvstore.lmcache",
             "  remote_storage_plugin.kvstore.class_name: KVStoreConnectorAdapter", f"  kvstore_url: {url}"]
    lines += [f"  {k}: {json.dumps(str(v))}" for k, v in (extra or {}).items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def lmcache_hits(config_path: str, rows: list[dict]) -> list[tuple[int, int]]:
    """(tokens hit, full-chunk tokens) per prompt, from a real LMCache engine built from ``config_path``."""
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig

    from kvstore.kv.keys import lmcache_metadata

    name = f"corpus-{os.getpid()}-{id(rows)}"
    engine = LMCacheEngineBuilder.get_or_create(name, LMCacheEngineConfig.from_file(config_path),
                                                lmcache_metadata(LAYOUT, model=MODEL), None, None, None)
    try:
        engine.post_init()
        return [(engine.lookup(tokens=_tokens(r)), len(_tokens(r)) // CHUNK * CHUNK) for r in rows]
    finally:
        LMCacheEngineBuilder.destroy(name)


def engine_config(config_path: str):
    from lmcache.v1.config import LMCacheEngineConfig

    return LMCacheEngineConfig.from_file(config_path)


# -- one process -------------------------------------------------------------------------------
def test_jsonl_parquet_and_a_text_directory_dump_the_same_chunks(tmp_path, model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": r["id"], "text": bytes(_tokens(r)).decode()} for r in corpus_rows(3, 6)]
    names, total = expected_names(rows)
    assert len(names) < total  # the shared system prompts
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "c.parquet"))
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    for r in rows:
        (texts / ("sub" if r["id"].startswith("s1") else "") / f"{r['id']}.txt").write_text(r["text"])
    (texts / ".hidden").write_text("not a prompt")
    sources = {"jsonl": write_jsonl(tmp_path / "c.jsonl", rows), "parquet": str(tmp_path / "c.parquet"),
               "text": str(texts)}
    for kind, source in sources.items():
        url = str(tmp_path / f"store-{kind}")
        report = dump_corpus(url, source, model=MODEL, hf_model=model_dir, chunk_size=CHUNK, batch_size=4,
                             manifest=tmp_path / f"{kind}.jsonl")
        assert (report.prompts, report.failed, report.written, report.chunks) == (18, 0, len(names), total), kind
        assert report.bytes == sum(LAYOUT.chunk_bytes(n) for n in _distinct_sizes(rows).values()), kind
        with kvstore.open(url) as store:
            assert set(store.list()) == names, kind
        ids = {r.id for r in read_manifest(tmp_path / f"{kind}.jsonl")}
        assert ids == ({f"{r['id']}.txt" if not r["id"].startswith("s1") else f"sub/{r['id']}.txt" for r in rows}
                       if kind == "text" else {r["id"] for r in rows}), kind
    # Batched and padded, each prompt's KV is the one it gives alone.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    with kvstore.open(str(tmp_path / "store-jsonl")) as store:
        for row in (rows[0], rows[-1]):
            ids = _tokens(row)
            with torch.no_grad():
                cache = model(torch.tensor([ids]), use_cache=True)
            cache = cache["cache"] if "cache" in cache else cache.past_key_values
            alone = torch.stack([torch.stack([layer.keys[0].transpose(0, 1).reshape(len(ids), -1),
                                              layer.values[0].transpose(0, 1).reshape(len(ids), -1)])
                                 for layer in cache.layers], dim=1)
            torch.testing.assert_close(load(store, ids, model=MODEL, layout=LAYOUT), alone, rtol=1e-4, atol=1e-5)


def _distinct_sizes(rows) -> dict[str, int]:
    return {c.name: c.num_tokens for r in rows for c in chunk_keys(_tokens(r), model=MODEL, layout=LAYOUT)}


def test_a_rerun_writes_only_what_is_missing(tmp_path, model_dir, monkeypatch):
    rows = corpus_rows(2, 5)
    source, url = write_jsonl(tmp_path / "c.jsonl", rows), str(tmp_path / "store")
    names, total = expected_names(rows)
    first = dump_corpus(url, source, model=MODEL, hf_model=model_dir, chunk_size=CHUNK)
    assert (first.written, first.skipped) == (len(names), total - len(names))
    with kvstore.open(url) as store:
        gone = sorted(names)[::4]
        store.delete_many(gone)
    again = dump_corpus(url, source, model=MODEL, hf_model=model_dir, chunk_size=CHUNK, manifest=tmp_path / "m.parquet")
    assert (again.written, again.skipped) == (len(gone), total - len(gone))
    assert sum(r.written for r in read_manifest(tmp_path / "m.parquet")) == len(gone)

    from kvstore.kv.corpus_model import HFModel

    def no_weights(self):
        raise AssertionError("a run with everything stored loaded the model")

    monkeypatch.setattr(HFModel, "_loaded", no_weights)
    third = dump_corpus(url, source, model=MODEL, hf_model=model_dir, chunk_size=CHUNK)
    assert (third.prompts, third.failed, third.written, third.skipped, third.bytes) == (10, 0, 0, total, 0)
    with kvstore.open(url) as store:
        assert set(store.list()) == names


def test_failed_prompts_are_reported_and_the_run_goes_on(tmp_path, model_dir):
    good = corpus_rows(2, 3)
    bad = [{"id": "too-long", "text": "x" * (MAX_POSITIONS + 1)}, {"id": "empty", "text": ""},
           {"id": "out-of-vocab", "tokens": [1, 2, 256]}, {"id": "not-ints", "tokens": [1, "two"]},
           {"id": "not-text", "text": 12}]
    rows = good[:3] + bad + good[3:]
    url = str(tmp_path / "store")
    report = dump_corpus(url, write_jsonl(tmp_path / "c.jsonl", rows), model=MODEL, hf_model=model_dir,
                         chunk_size=CHUNK, batch_size=4, manifest=tmp_path / "m.jsonl")
    errors = {r.id: r.error for r in read_manifest(tmp_path / "m.jsonl")}
    assert len(errors) == len(rows) and report.failed == len(bad)
    assert "too long: 129 tokens" in errors["too-long"] and "max_position_embeddings" in errors["too-long"]
    assert "empty" in errors["empty"] and "256 is outside the vocabulary" in errors["out-of-vocab"]
    assert "token 1 is 'two'" in errors["not-ints"] and "not a string" in errors["not-text"]
    assert all(errors[r["id"]] is None for r in good)
    names, _ = expected_names(good)
    with kvstore.open(url) as store:
        assert set(store.list()) == names
    assert dict(report.failures) == {k: v for k, v in errors.items() if v}


def test_bad_input_is_a_config_error_naming_the_file_and_line(tmp_path, model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def run(path, **kw):
        return dump_corpus(str(tmp_path / "store"), path, model=MODEL, hf_model=model_dir, chunk_size=CHUNK, **kw)

    path = tmp_path / "c.jsonl"
    path.write_text('{"id": 1, "text": "fine"}\n\n{"id": 2, "prompt": "hello"}\n')
    with pytest.raises(ConfigError, match=r"c\.jsonl:3: neither a 'text' nor a 'tokens' field \(it has 'id', 'prompt'\)"):
        run(str(path))
    with pytest.raises(ConfigError, match=r"c\.jsonl:1: neither a 'prompt' nor a 'tokens' field \(it has 'id', 'text'\)"):
        run(str(path), text_field="prompt")
    path.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ConfigError, match=r"c\.jsonl:2: not JSON"):
        run(str(path))
    pq.write_table(pa.table({"body": ["a"]}), str(tmp_path / "c.parquet"))
    with pytest.raises(ConfigError, match=r"c\.parquet: neither a 'text' nor a 'tokens' column \(it has 'body'\)"):
        run(str(tmp_path / "c.parquet"))
    (tmp_path / "c.csv").write_text("text\nhello\n")
    for missing, message in ((tmp_path / "nowhere.jsonl", "no such file"), (tmp_path / "c.csv", "not a JSONL")):
        with pytest.raises(ConfigError, match=message):
            run(str(missing))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_bytes(b"\xff\xfe not UTF-8")
    with pytest.raises(ConfigError, match=r"texts/a\.txt: not UTF-8"):
        run(str(tmp_path / "texts"))
    saved = tmp_path / "hf"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ConfigError, match="pip install datasets"):
            run(str(saved))


def test_a_saved_datasets_dataset(tmp_path, model_dir):
    datasets = pytest.importorskip("datasets")
    rows = corpus_rows(2, 3)
    datasets.Dataset.from_list([{"id": r["id"], "text": bytes(_tokens(r)).decode()} for r in rows]).save_to_disk(
        str(tmp_path / "hf"))
    report = dump_corpus(str(tmp_path / "store"), tmp_path / "hf", model=MODEL, hf_model=model_dir, chunk_size=CHUNK)
    assert (report.prompts, report.failed, report.written) == (6, 0, len(expected_names(rows)[0]))


def test_cli_dump_corpus_takes_its_settings_from_the_lmcache_file(tmp_path, model_dir, capsys):
    rows = corpus_rows(3, 4)
    url = str(tmp_path / "store")
    config = lmcache_yaml(tmp_path / "lmcache.yaml", url)
    source = write_jsonl(tmp_path / "c.jsonl", rows)
    argv = ["dump", "--model", MODEL, "-c", config, "--hf-model", model_dir, "--corpus", source, "--batch-size", "5"]
    assert main([*argv, "--json", "--manifest", str(tmp_path / "m.parquet")]) == 0
    out = json.loads(capsys.readouterr().out)
    names, total = expected_names(rows, save_unfull_chunk=False)
    assert (out["chunk_size"], out["save_unfull_chunk"], out["prompts"], out["written"]) == (CHUNK, False, 12, len(names))
    assert len(read_manifest(tmp_path / "m.parquet")) == 12
    with kvstore.open(url) as store:
        assert set(store.list()) == names  # full chunks only, as the file says
    assert all(hit == full for hit, full in lmcache_hits(config, rows))
    assert main(argv) == 0  # the table, and everything is skipped
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:6] == ["prompts", "failed", "tokens", "chunks", "written", "skipped"]
    assert table.splitlines()[2].split()[3:6] == [str(total), "0", str(total)]
    write_jsonl(tmp_path / "bad.jsonl", [{"id": "empty", "text": ""}])
    assert main([*argv[:-4], "--corpus", str(tmp_path / "bad.jsonl")]) == EXIT_FAILED
    assert "prompt empty: empty prompt" in capsys.readouterr().err
    assert main([*argv, "--text", source]) == 2
    assert "drop --input / --text" in capsys.readouterr().err


# -- Ray ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local two-CPU Ray cluster on loopback only, with the actor-exit hook armed by a file."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed: pip install 'kvcache-store[ray]'")
    from kvstore.kv.corpus_ray import EXIT_HOOK_ENV

    hook = tmp_path_factory.mktemp("ray-hook") / "exit-after"
    # Ray reads these when imported and at start: bind and advertise 127.0.0.1 only; workers inherit them.
    saved = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", EXIT_HOOK_ENV, "PYTHONHASHSEED")}
    os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", EXIT_HOOK_ENV: str(hook), "PYTHONHASHSEED": "0"})
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield hook
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _temp_files(root: str) -> list[str]:
    return [f for _, _, files in os.walk(root) for f in files if "#tmp." in f]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["file", pytest.param("moto", marks=pytest.mark.servers)])
def test_ray_dumps_a_corpus_once_per_chunk_and_survives_a_killed_actor(where, ray_cluster, tmp_path, model_dir,
                                                                       request, unique_name):
    rows = corpus_rows(10, 20)
    if where == "file":
        url, extra = str(tmp_path / "store"), {}
    else:
        server = request.getfixturevalue("s3_servers").get("moto")
        bucket = unique_name("corpus")
        server.create_bucket(bucket)
        url, extra = server.url(bucket, "kv"), server.extra_config()
    config = lmcache_yaml(tmp_path / "lmcache.yaml", url, extra)
    for earlier in ray_cluster.parent.glob("*.claimed-*"):
        earlier.unlink()
    ray_cluster.write_text("2")  # the first actor to start exits while writing its third batch
    if where == "file":  # Ray Data reads a directory of text files here, a JSONL file into moto
        source = tmp_path / "texts"
        ids = sorted(("sub/" if r["id"].endswith("-q1") else "") + f"{r['id']}.txt" for r in rows)
        (source / "sub").mkdir(parents=True)
        for name, row in zip(sorted(ids, key=lambda i: i.removeprefix("sub/")), sorted(rows, key=lambda r: r["id"])):
            (source / name).write_bytes(bytes(_tokens(row)))
    else:
        source, ids = write_jsonl(tmp_path / "c.jsonl", rows), sorted(r["id"] for r in rows)
    report = dump_corpus(url, source, model=MODEL, hf_model=model_dir, extra_config=extra,
                         engine_config=engine_config(config), batch_size=8, ray_address="", actors=2, actor_cpus=0.5,
                         manifest=tmp_path / "m.parquet")
    died = [p for p in os.listdir(ray_cluster.parent) if ".claimed-" in p]
    assert len(died) == 1 and not ray_cluster.exists(), "no actor was killed"
    names, total = expected_names(rows, save_unfull_chunk=False)
    assert (report.prompts, report.failed, report.chunks) == (200, 0, total)
    manifest = read_manifest(tmp_path / "m.parquet")
    assert sorted(r.id for r in manifest) == ids and all(r.error is None for r in manifest)
    with kvstore.open(url, extra) as store:
        stored = list(scan(store, with_metadata=True))
    # Exactly the expected chunks, each once: a shared system prompt's three chunks serve its twenty questions.
    assert sorted(c.key for c in stored) == sorted(names) and len(names) == total - 10 * 19 * 3
    assert all(c.status == "ok" and c.tokens == CHUNK for c in stored)  # whole, none cut short by the kill
    if where == "file":
        # A write in flight when the actor died may leave its temp file (never a torn object):
        # at most the writes of one batch, and what `kv gc` sweeps.
        assert len(_temp_files(url)) <= 8
        with kvstore.open(url, extra) as store:
            store.backend.unwrap().remove_stale_temp_files(0)
        assert _temp_files(url) == []
    assert all(hit == full for hit, full in lmcache_hits(config, rows))


@pytest.mark.slow
def test_ray_reports_a_bad_row_as_in_one_process(ray_cluster, tmp_path, model_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "text": "fine"}, {"id": "b", "body": "no prompt"}])
    with pytest.raises(ConfigError, match=r"bad\.jsonl: the row with id 'b': neither a 'text' nor a 'tokens' field"):
        dump_corpus(str(tmp_path / "store"), bad, model=MODEL, hf_model=model_dir, chunk_size=CHUNK, ray_address="",
                    actors=1, actor_cpus=0.5)
    with pytest.raises(ConfigError, match="2 actors of 1 CPUs leave no CPU to read the corpus with on a cluster of 2"):
        dump_corpus(str(tmp_path / "store"), bad, model=MODEL, hf_model=model_dir, ray_address="", actors=2)

"""``kvstore kv cp`` and ``kvstore.kv.copy``: a dumped corpus moved between stores, resumable and verified."""

from __future__ import annotations

import json
import os
import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lmcache")
pytest.importorskip("transformers")

from test_corpus import ray_cluster  # noqa: E402, F401  (the local two-CPU Ray cluster on loopback)

import kvstore  # noqa: E402
from kvstore.cli.common import EXIT_FAILED, EXIT_STORE, EXIT_USAGE  # noqa: E402
from kvstore.cli.main import main  # noqa: E402
from kvstore.kv import chunk_keys, copy, dump, verify  # noqa: E402
from kvstore.kv.copy import user_metadata  # noqa: E402
from kvstore.layers.integrity import CRC_KEY  # noqa: E402

pytestmark = pytest.mark.lmcache  # torch, transformers and lmcache build and key the corpus

MODEL, OTHER = "org/tiny-llama", "org/other-llama"
SHARED = "Every request starts with this system prompt. " * 2  # 94 tokens: five full chunks shared by all
QUESTIONS = ("What is a KV cache?", "Why object stores?", "How large is a chunk of keys and values?",
             "Which layers are stored?", "Who reads them back?", "When are they evicted?")


@pytest.fixture(scope="module")
def corpus():
    """(layout, [(tokens, past_key_values)]) of a tiny random-weight Llama, as the demo builds it."""
    from kvstore.demo import _model
    from kvstore.kv import KVLayout

    config, model = _model()
    layout = KVLayout.from_hf_config(config, dtype=torch.bfloat16, chunk_size=16)
    prompts = []
    for question in QUESTIONS:
        tokens = list((SHARED + question).encode())
        with torch.no_grad():
            prompts.append((tokens, model(torch.tensor([tokens]), use_cache=True).past_key_values))
    return layout, prompts


def _dump(store, corpus, model: str = MODEL) -> int:
    """Dump every prompt; the number of distinct chunks the store then holds for ``model``."""
    layout, prompts = corpus
    for tokens, kv in prompts:
        dump(store, tokens, kv, model=model, layout=layout)
    return len({c.name for tokens, _ in prompts for c in chunk_keys(tokens, model=model, layout=layout)})


def _hits(store, corpus, model: str = MODEL) -> list[tuple[int, dict]]:
    layout, prompts = corpus
    return [(r.cached_tokens, r.counts()) for r in (verify(store, t, model=model, layout=layout) for t, _ in prompts)]


def _s3(s3_servers, unique_name, name: str = "moto", prefix: str = "kv"):
    """(url, extra_config, server) of a fresh bucket on one of the loopback servers."""
    server = s3_servers.get(name)
    bucket = unique_name("cp")
    server.create_bucket(bucket)
    return server.url(bucket, prefix), server.extra_config(), server


def _sets(flag: str, extra: dict) -> list[str]:
    return [a for k, v in extra.items() for a in (flag, f"{k}={v}")]


def _cp(capsys, *argv: str) -> tuple[int, dict, str]:
    code = main(["kv", "cp", *argv, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


class _StopAfter:
    """The destination store, except that it crashes (a non-store error: the copy aborts) after ``puts`` puts."""

    def __init__(self, store, puts: int) -> None:
        self._store, self._left, self._lock = store, puts, threading.Lock()

    def __getattr__(self, name):
        return getattr(self._store, name)

    def put(self, *args, **kwargs):
        with self._lock:
            self._left -= 1
            if self._left < 0:
                raise RuntimeError("killed mid-copy")
        return self._store.put(*args, **kwargs)


@pytest.mark.servers
def test_moto_to_seaweedfs_serves_the_same_hits_with_the_same_metadata(tmp_path, corpus, s3_servers, unique_name, capsys):
    src_url, src_extra, _ = _s3(s3_servers, unique_name)
    dst_url, dst_extra, _ = _s3(s3_servers, unique_name, "seaweedfs")
    with kvstore.open(src_url, src_extra) as src:
        chunks = _dump(src, corpus)
        src_hits = _hits(src, corpus)
        src_infos = {i.key: src.stat(i.key) for i in src.scan()}
    assert len(src_infos) == chunks and all(t == len(p[0]) for (t, _), p in zip(src_hits, corpus[1]))
    config = tmp_path / "src.json"
    config.write_text(json.dumps(src_extra))
    code, report, err = _cp(capsys, src_url, dst_url, "--src-config", str(config), *_sets("--dst-set", dst_extra))
    assert code == 0, err
    assert (report["copied"], report["skipped"], report["replaced"], report["failed"]) == (chunks, 0, 0, 0)
    assert report["bytes"] == sum(i.size for i in src_infos.values()) and report["gibps"] > 0
    with kvstore.open(dst_url, dst_extra) as dst:
        assert _hits(dst, corpus) == src_hits
        for key, info in src_infos.items():
            there = dst.stat(key)
            assert user_metadata(there.metadata) == user_metadata(info.metadata) and "lmcache-tokens" in there.metadata
            assert there.metadata[CRC_KEY] == info.metadata[CRC_KEY] and there.size == info.size
        with kvstore.open(src_url, src_extra) as src:
            again = copy(src, dst)
        assert (again.copied, again.skipped, again.replaced, again.bytes) == (0, chunks, 0, 0)
        assert "put" not in dst.metrics()["operations"]  # the second copy wrote nothing


@pytest.mark.servers
def test_file_to_moto_by_model_and_prefix_then_the_rest(tmp_path, corpus, s3_servers, unique_name, capsys):
    src_url = str(tmp_path / "src")
    dst_url, dst_extra, _ = _s3(s3_servers, unique_name)
    with kvstore.open(src_url) as src:
        mine, other = _dump(src, corpus), _dump(src, corpus, OTHER)
        src_hits = _hits(src, corpus), _hits(src, corpus, OTHER)
        first_other = next(k for k in src.list() if k.startswith("org_other"))
    dst_sets = _sets("--dst-set", dst_extra)
    code, report, _ = _cp(capsys, src_url, dst_url, *dst_sets, "--model", MODEL)
    assert code == 0 and (report["copied"], report["skipped"]) == (mine, 0)
    with kvstore.open(dst_url, dst_extra) as dst:
        assert all(k.startswith("org_tiny-llama@") for k in dst.list()) and len(list(dst.list())) == mine
    code, report, _ = _cp(capsys, src_url, dst_url, *dst_sets, "--prefix", first_other)
    assert code == 0 and (report["copied"], report["skipped"]) == (1, 0)
    code, report, _ = _cp(capsys, src_url, dst_url, *dst_sets)  # the rest: only the other model's missing chunks
    assert code == 0 and (report["copied"], report["skipped"], report["replaced"]) == (other - 1, mine + 1, 0)
    with kvstore.open(dst_url, dst_extra) as dst:
        assert (_hits(dst, corpus), _hits(dst, corpus, OTHER)) == src_hits


@pytest.mark.servers
def test_an_interrupted_copy_rerun_copies_only_what_is_missing(tmp_path, corpus, s3_servers, unique_name):
    with kvstore.open(str(tmp_path / "src")) as src:
        chunks = _dump(src, corpus)
        dst_url, dst_extra, _ = _s3(s3_servers, unique_name)
        with kvstore.open(dst_url, dst_extra) as dst:
            with pytest.raises(RuntimeError, match="killed mid-copy"):
                copy(src, _StopAfter(dst, 7), window=4)
            before = len(list(dst.list()))
            assert 7 <= before < chunks  # the window under way when it crashed may have finished a few more
        with kvstore.open(dst_url, dst_extra) as dst:
            report = copy(src, dst)
            assert (report.copied, report.skipped, report.failed) == (chunks - before, before, 0)
            assert dst.metrics()["operations"]["put"]["calls"] == chunks - before  # nothing written twice
            assert _hits(dst, corpus) == _hits(src, corpus)


@pytest.mark.servers
def test_a_corrupted_source_object_fails_and_is_never_written(tmp_path, corpus, s3_servers, unique_name, capsys):
    src_url, src_extra, server = _s3(s3_servers, unique_name, prefix="")
    with kvstore.open(src_url, src_extra) as src:
        chunks = _dump(src, corpus)
        victim = sorted(src.list())[3]
        info = src.stat(victim)
    bad = bytearray(server.client().get_object(Bucket=src_url[5:], Key=victim)["Body"].read())
    bad[100] ^= 0xFF  # one flipped byte behind the store's back, every header (the CRC32C included) left as it was
    server.client().put_object(Bucket=src_url[5:], Key=victim, Body=bytes(bad), Metadata=dict(info.metadata))
    for checks in ("crc32c", "none"):  # a stored CRC32C is checked even with the source's checksums off
        dst = tmp_path / f"dst-{checks}"
        code, report, err = _cp(capsys, src_url, str(dst), *_sets("--src-set", {**src_extra, "kvstore_checksum": checks}))
        assert code == EXIT_FAILED and (report["copied"], report["failed"]) == (chunks - 1, 1), checks
        assert report["failures"][0]["key"] == victim and "IntegrityError" in report["failures"][0]["reason"]
        assert f"failed: {victim}: IntegrityError" in err
        with kvstore.open(str(dst)) as out:
            assert out.stat(victim) is None and len(list(out.list())) == chunks - 1


def test_dry_run_lists_copies_replacements_and_skips_and_writes_nothing(tmp_path, corpus, capsys):
    src_url, dst_url = str(tmp_path / "src"), str(tmp_path / "dst")
    with kvstore.open(src_url) as src, kvstore.open(dst_url) as dst:
        chunks = _dump(src, corpus)
        same, changed = sorted(src.list())[:2]
        dst.put(same, src.get(same), user_metadata(src.stat(same).metadata))
        dst.put(changed, b"stale bytes of another size", user_metadata(src.stat(changed).metadata))
    before = {p: os.path.getmtime(p) for p in (tmp_path / "dst").rglob("*")}
    code, report, _ = _cp(capsys, src_url, dst_url, "--dry-run")
    actions = {i["key"]: i["action"] for i in report["items"]}
    assert code == 0 and report["dry_run"] and len(actions) == chunks
    assert (actions[same], actions[changed]) == ("skip", "replace")
    assert (report["copied"], report["replaced"], report["skipped"]) == (chunks - 2, 1, 1)
    assert {p: os.path.getmtime(p) for p in (tmp_path / "dst").rglob("*")} == before  # nothing written
    assert main(["kv", "cp", src_url, str(tmp_path / "new"), "--dry-run"]) == 0
    assert "would copy" in capsys.readouterr().out and not (tmp_path / "new").exists()

    code, report, _ = _cp(capsys, src_url, dst_url)
    assert (report["copied"], report["replaced"], report["skipped"]) == (chunks - 2, 1, 1)
    with kvstore.open(src_url) as src, kvstore.open(dst_url) as dst:
        assert dst.get(changed) == src.get(changed)
        assert _hits(dst, corpus) == _hits(src, corpus)


@pytest.mark.servers
def test_bad_input_is_loud_and_writes_nothing(tmp_path, corpus, s3_servers, unique_name, capsys):
    src_url = str(tmp_path / "src")
    with kvstore.open(src_url) as src:
        _dump(src, corpus)
    assert main(["kv", "cp", src_url, "file://" + src_url]) == EXIT_USAGE
    assert "same store" in capsys.readouterr().err
    url, extra, server = _s3(s3_servers, unique_name, prefix="")
    sets = _sets("--src-set", extra) + _sets("--dst-set", extra)
    assert main(["kv", "cp", url, url + "/backup", *sets]) == EXIT_USAGE
    assert "lies inside the source" in capsys.readouterr().err
    assert main(["kv", "cp", "s3:/nope", str(tmp_path / "out")]) == EXIT_USAGE
    assert "SRC: malformed URL" in capsys.readouterr().err
    missing = unique_name("missing")
    assert main(["kv", "cp", src_url, server.url(missing), *_sets("--dst-set", extra)]) == EXIT_STORE
    assert "BucketNotFound" in capsys.readouterr().err
    assert missing not in [b["Name"] for b in server.client().list_buckets()["Buckets"]]
    assert main(["kv", "cp", str(tmp_path / "no-such-store"), str(tmp_path / "out")]) == EXIT_STORE
    assert "BucketNotFound" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_progress_bar_is_drawn_on_a_terminal_only(tmp_path, corpus, capsys):
    from test_kv_cli import _stderr_on_a_terminal

    with kvstore.open(str(tmp_path / "src")) as src:
        _dump(src, corpus)
    code, stderr = _stderr_on_a_terminal("kv", "cp", str(tmp_path / "src"), str(tmp_path / "dst"))
    assert code == 0 and ("chunk/s" in stderr or "chunk [" in stderr), stderr
    assert main(["kv", "cp", str(tmp_path / "src"), str(tmp_path / "dst2")]) == 0
    assert "chunk/s" not in capsys.readouterr().err  # stderr is no terminal here



@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_ray_copies_the_same_window_by_window_and_a_rerun_copies_nothing(tmp_path, capsys):
    src_url, dst_url = str(tmp_path / "src"), str(tmp_path / "dst")
    with kvstore.open(src_url) as src:
        for i in range(60):
            src.put(f"org_tiny-llama@1@0@{i:016x}@bfloat16", os.urandom(512 + 37 * i), {"lmcache-tokens": str(16 * i)})
        victim = sorted(src.list())[17]
        expected = {i.key: (src.get(i.key), user_metadata(src.stat(i.key).metadata)) for i in src.scan()}
    damaged = next((tmp_path / "src").rglob(victim + "*"))
    body = bytearray(damaged.read_bytes())
    body[-1] ^= 0xFF  # one flipped payload byte, its CRC32C left as it was
    damaged.write_bytes(bytes(body))
    seen: list[str] = []
    with kvstore.open(src_url) as src, kvstore.open(dst_url) as dst:
        # windows of 8 on two actors: eight windows, at most four out at a time, merged in listing order
        report = copy(src, dst, window=8, ray_address="", on_item=lambda key, action, size: seen.append(key))
    assert seen == sorted(expected)
    assert (report.copied, report.skipped, report.replaced, report.failed) == (59, 0, 0, 1)
    assert report.failures[0].key == victim and "IntegrityError" in report.failures[0].reason
    assert report.bytes == sum(len(b) for k, (b, _) in expected.items() if k != victim)
    with kvstore.open(dst_url) as dst:
        assert sorted(dst.list()) == sorted(k for k in expected if k != victim)
        for key in dst.list():
            there = dst.stat(key)
            assert (dst.get(key), user_metadata(there.metadata)) == expected[key] and CRC_KEY in there.metadata
    code, again, err = _cp(capsys, src_url, dst_url, "--ray")
    assert code == EXIT_FAILED and (again["copied"], again["skipped"], again["replaced"], again["bytes"]) == (0, 59, 0, 0)
    assert again["failures"][0]["key"] == victim and f"failed: {victim}: IntegrityError" in err

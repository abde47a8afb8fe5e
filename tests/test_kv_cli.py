"""``kvstore dump`` and ``kvstore kv ls | stat | verify | gc``, and the end-to-end demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lmcache")
safetensors_torch = pytest.importorskip("safetensors.torch")

from kvstore.cli.common import EXIT_FAILED, EXIT_USAGE  # noqa: E402
from kvstore.cli.kv_cmd import parse_age, parse_size  # noqa: E402
from kvstore.cli.main import main  # noqa: E402

pytestmark = pytest.mark.lmcache


@pytest.fixture
def prompts(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "prompts.safetensors"
    safetensors_torch.save_file({
        "a.tokens": torch.randint(0, 1000, (20,), generator=g), "a.kv": torch.randn(2, 2, 20, 32, generator=g).half(),
        "b.tokens": torch.randint(0, 1000, (9,), generator=g), "b.kv": torch.randn(2, 2, 9, 32, generator=g).half(),
    }, str(path))
    return str(path)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_dump_ls_verify_gc(tmp_path, prompts, capsys):
    url = str(tmp_path / "store")
    common = ("--url", url, "--model", "org/m", "--input", prompts, "--chunk-size", "8")
    code, out = _run(capsys, "dump", *common, "--json")
    assert code == 0
    rows = {r["prompt"]: r for r in json.loads(out)["prompts"]}
    assert (rows["a"]["written"], rows["b"]["written"]) == (3, 2) and rows["a"]["bytes"] == 2 * 2 * 20 * 32 * 2
    code, out = _run(capsys, "dump", *common, "--json")
    assert [r["skipped"] for r in json.loads(out)["prompts"]] == [3, 2]

    code, out = _run(capsys, "kv", "ls", "--url", url, "--json", "--long")
    chunks = json.loads(out)
    assert code == 0 and len(chunks) == 5 and sorted(c["tokens"] for c in chunks) == [1, 4, 8, 8, 8]
    code, out = _run(capsys, "kv", "stat", "--url", url, "--json")
    models = json.loads(out)["models"]
    assert code == 0 and models[0]["chunks"] == 5 and models[0]["model"] == "org_m" and models[0]["damaged"] == 0

    code, out = _run(capsys, "kv", "verify", *common, "--json")
    assert code == 0 and json.loads(out)["ok"]
    os.remove(os.path.join(url, chunks[0]["key"] + "#"))
    code, out = _run(capsys, "kv", "verify", *common, "--json")
    assert code == EXIT_FAILED and not json.loads(out)["ok"]

    code, out = _run(capsys, "kv", "gc", "--url", url, "--max-bytes", "0", "--json")
    assert code == 0 and json.loads(out)["dry_run"] and len(json.loads(out)["removed"]) == 4
    code, out = _run(capsys, "kv", "gc", "--url", url, "--max-bytes", "0", "--delete", "--json")
    assert len(json.loads(out)["removed"]) == 4
    code, out = _run(capsys, "kv", "ls", "--url", url, "--json")
    assert json.loads(out) == []


def test_dump_from_a_local_transformers_model(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "model"))
    (tmp_path / "p.txt").write_text("hello object store " * 3)
    url = str(tmp_path / "store")
    args = ("--url", url, "--model", "tiny", "--hf-model", str(tmp_path / "model"), "--text", str(tmp_path / "p.txt"),
            "--chunk-size", "16", "--dtype", "float32")
    code, out = _run(capsys, "dump", *args, "--json")
    report = json.loads(out)
    assert code == 0 and report["prompts"][0]["tokens"] == 57 and report["prompts"][0]["written"] == 4
    assert report["layout"]["num_kv_heads"] == 2 and report["layout"]["head_dim"] == 16
    code, out = _run(capsys, "kv", "verify", *args, "--json")
    assert code == 0 and json.loads(out)["prompts"][0]["cached_tokens"] == 57


def test_bad_arguments_exit_with_usage(tmp_path, capsys):
    assert main(["kv", "gc", "--url", str(tmp_path), "--older-than", "lots"]) == EXIT_USAGE
    assert main(["kv", "gc", "--url", str(tmp_path), "--max-bytes", "lots"]) == EXIT_USAGE
    bad = tmp_path / "bad.safetensors"
    safetensors_torch.save_file({"x": torch.zeros(3)}, str(bad))
    assert main(["dump", "--url", str(tmp_path / "s"), "--model", "m", "--input", str(bad)]) == EXIT_USAGE
    assert "'tokens' and 'kv'" in capsys.readouterr().err


def test_sizes_and_ages_parse():
    assert parse_size("500M") == 500_000_000 and parse_size("2GiB") == 2 * 2**30 and parse_size("10") == 10
    assert parse_age("90s") == 90 and parse_age("7d") == 7 * 86400 and parse_age("3") == 3


def test_demo_passes_from_a_clean_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}  # the demo fixes it itself
    result = subprocess.run([sys.executable, "-m", "kvstore.demo"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 3 prompts" in result.stdout and "NO" not in result.stdout
    assert os.path.isdir(tmp_path / ".kvstore-demo")


def test_dump_takes_chunk_size_and_save_unfull_chunk_from_the_lmcache_file(tmp_path, capsys):
    """Dumped with -c lmcache.yaml, a real LMCache engine built from the same file hits every full chunk."""
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig

    from kvstore.kv import KVLayout
    from kvstore.kv.keys import lmcache_metadata

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 1000, (150,), generator=g)  # two full chunks of 64 and a short one
    path = tmp_path / "p.safetensors"
    safetensors_torch.save_file({"tokens": tokens, "kv": torch.randn(2, 2, 150, 32, generator=g).half()}, str(path))
    url = str(tmp_path / "store")
    config = tmp_path / "lmcache.yaml"
    config.write_text(f"""chunk_size: 64
save_unfull_chunk: False
local_cpu: True
max_local_cpu_size: 0.05
remote_storage_plugins: ["kvstore"]
extra_config:
  remote_storage_plugin.kvstore.module_path: kvstore.lmcache
  remote_storage_plugin.kvstore.class_name: KVStoreConnectorAdapter
  kvstore_url: {url}
""")
    code, out = _run(capsys, "dump", "--model", "org/m", "-c", str(config), "--input", str(path), "--json")
    report = json.loads(out)
    assert code == 0 and report["layout"]["chunk_size"] == 64 and report["prompts"][0]["written"] == 2
    layout = KVLayout(2, 1, 32, "float16", chunk_size=64)
    engine = LMCacheEngineBuilder.get_or_create("kv-cli-file", LMCacheEngineConfig.from_file(str(config)),
                                                lmcache_metadata(layout, model="org/m"), None, None, None)
    try:
        engine.post_init()
        assert engine.lookup(tokens=tokens) == 128
    finally:
        LMCacheEngineBuilder.destroy("kv-cli-file")
    assert main(["kv", "verify", "-c", str(config), "--model", "org/m", "--input", str(path)]) == 0
    capsys.readouterr()
    code, out = _run(capsys, "kv", "ls", "-c", str(config), "--long", "--json")  # the store comes from the file
    assert code == 0 and sorted(c["tokens"] for c in json.loads(out)) == [64, 64]
    code = main(["kv", "verify", "-c", str(config), "--model", "org/m", "--input", str(path), "--json",
                 "--chunk-size", "32"])
    assert code == EXIT_FAILED and "--chunk-size overrides chunk_size: 64" in capsys.readouterr().err


def test_url_is_positional_and_options_mix_with_positionals(tmp_path, prompts, capsys):
    url = str(tmp_path / "store")
    assert main(["dump", url, "--model", "org/m", "--input", prompts, "--chunk-size", "8"]) == 0
    capsys.readouterr()
    code, out = _run(capsys, "kv", "ls", url, "--json", "-l", "org_m@1")
    assert code == 0 and len(json.loads(out)) == 5
    code, out = _run(capsys, "kv", "ls", "--json", "--url", url, "org_m@1@0@nothing")
    assert code == 0 and json.loads(out) == []
    assert _run(capsys, "kv", "verify", "--model", "org/m", url, "--input", prompts, "--chunk-size", "8")[0] == 0
    assert _run(capsys, "kv", "stat", "--json", url)[0] == 0
    assert _run(capsys, "kv", "gc", "--max-bytes", "0", url, "--json")[0] == 0
    assert main(["kv", "ls", "--url", url, str(tmp_path / "other"), "x"]) == EXIT_USAGE


def test_damaged_chunks_are_reported_per_chunk_and_the_rest_is_checked(tmp_path, prompts, capsys):
    url = str(tmp_path / "store")
    common = ("--model", "org/m", "--input", prompts, "--chunk-size", "8")
    assert main(["dump", url, *common]) == 0
    capsys.readouterr()
    names = sorted(n for n in os.listdir(url) if n.endswith("#"))
    with open(os.path.join(url, names[0]), "r+b") as f:  # cut short
        f.truncate(os.path.getsize(os.path.join(url, names[0])) - 50)
    with open(os.path.join(url, names[1]), "r+b") as f:  # one byte of the payload flipped
        f.seek(-10, os.SEEK_END)
        byte = f.read(1)
        f.seek(-10, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, out = _run(capsys, "kv", "verify", url, *common, "--json")
    counts = [p["counts"] for p in json.loads(out)["prompts"]]
    assert code == EXIT_FAILED and sum(c.get("corrupt", 0) for c in counts) == 2 and sum(c.get("ok", 0) for c in counts) == 3
    code, out = _run(capsys, "kv", "ls", url, "-l", "--json")
    assert code == EXIT_FAILED and sorted(c["status"] for c in json.loads(out)) == ["corrupt"] + ["ok"] * 4
    code, out = _run(capsys, "kv", "stat", url, "--json")
    assert code == EXIT_FAILED and json.loads(out)["models"][0]["damaged"] == 1


def _stderr_on_a_terminal(*argv: str) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal, as a user at a shell sees it; (exit code, stderr)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has 0 columns
    code = "import sys; from kvstore.cli.main import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.DEVNULL, stderr=slave,
                               env={**os.environ, "PYTHONHASHSEED": "0"})
    os.close(slave)
    seen = bytearray()
    while True:
        try:
            piece = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not piece:
            break
        seen += piece
    os.close(master)
    return process.wait(timeout=60), seen.decode(errors="replace")


def test_long_listings_verify_and_gc_draw_a_progress_bar_on_a_terminal_only(tmp_path, prompts, capsys):
    url = str(tmp_path / "store")
    common = ("--model", "org/m", "--input", prompts, "--chunk-size", "8")
    assert _run(capsys, "dump", url, *common, "--json")[0] == 0
    for argv in (("kv", "ls", "-l", url), ("kv", "verify", url, *common), ("kv", "gc", url, "--max-bytes", "0")):
        code, stderr = _stderr_on_a_terminal(*argv)
        assert code == 0, stderr
        assert "chunk/s" in stderr or "chunk [" in stderr, f"{argv}: no progress bar on the terminal: {stderr!r}"
        piped = subprocess.run([sys.executable, "-c", "import sys; from kvstore.cli.main import main; "
                                "sys.exit(main(sys.argv[1:]))", *argv], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHONHASHSEED": "0"})
        assert piped.returncode == 0 and "chunk/s" not in piped.stderr and "\r" not in piped.stderr, piped.stderr


def test_read_only_commands_on_a_missing_file_root_fail_loudly_and_create_nothing(tmp_path, prompts, capsys):
    missing = tmp_path / "no-such-store"
    for argv in (["ls", str(missing)], ["get", str(missing), "k"], ["stat", str(missing), "k"],
                 ["kv", "ls", str(missing)], ["kv", "ls", "-l", str(missing)], ["kv", "stat", str(missing)],
                 ["kv", "verify", str(missing), "--model", "org/m", "--input", prompts],
                 ["kv", "gc", str(missing), "--max-bytes", "0"]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 3 and "BucketNotFound" in err and "does not exist" in err, (argv, code, err)
        said = "kvstore " + " ".join(argv[:2] if argv[0] == "kv" else argv[:1]) + ": BucketNotFound"
        assert any(line.startswith(said) for line in err.splitlines()), err  # names the subcommand
        assert not missing.exists(), argv
    assert main(["conformance", "--list", str(missing)]) == 0  # listing the cases touches no store
    assert "integrity-altered" in capsys.readouterr().out and not missing.exists()

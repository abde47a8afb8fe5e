"""``kvstore dump --corpus``: a whole corpus of prompts through a local model, in one process or on Ray.

Chunk size and the unfull-chunk policy come from the ``-c`` LMCache file as for every dump
(``key_settings``); the summary is a table (or ``--json``), one row per prompt goes to
``--manifest``, and a progress bar runs on a terminal in one process (Ray draws its own).
"""

from __future__ import annotations

import argparse
import sys

from kvstore.cli.common import EXIT_FAILED, human_bytes, load_extra_config, print_json, print_table
from kvstore.errors import ConfigError


def add_corpus_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a corpus (--corpus, with --hf-model)")
    g.add_argument("--corpus", metavar="PATH", help="prompts: a JSONL or Parquet file, a directory of text files, "
                   "or a saved Hugging Face datasets dataset")
    g.add_argument("--text-field", default="text", metavar="NAME", help="the field holding a prompt's text (text)")
    g.add_argument("--tokens-field", default="tokens", metavar="NAME",
                   help="the field holding its token ids, used before the text (tokens)")
    g.add_argument("--id-field", default="id", metavar="NAME", help="the field holding its id (id; default a digest)")
    g.add_argument("--manifest", metavar="FILE", help="one row per prompt: JSON lines, or Parquet for FILE.parquet")
    g.add_argument("--batch-size", type=int, default=16, help="prompts checked and run at a time (16)")
    g.add_argument("--max-batch-tokens", type=int, default=8192, help="padded tokens per forward pass at most (8192)")
    g.add_argument("--device", help="torch device for the model (default: cuda when there is one, else cpu)")
    g.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on Ray Data (ADDRESS: auto, ray://host:10001; none: ray.init()'s default)")
    g.add_argument("--actors", type=int, help="Ray actors (default: one per GPU, else one per --actor-cpus CPUs but one)")
    g.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs per Ray actor without GPUs (1)")


def cmd_dump_corpus(args: argparse.Namespace) -> int:
    from kvstore.cli.kv_dump_cmd import key_settings, progress_bar
    from kvstore.kv import dump_corpus, hash_seed

    if args.input or args.text:
        raise ConfigError("--corpus takes its prompts from the corpus: drop --input / --text")
    if not args.hf_model:
        raise ConfigError("--corpus needs --hf-model DIR: the model that computes the KV caches")
    chunk, unfull, engine_config = key_settings(args)
    update = progress_bar(0, unit="prompt") if args.ray is None else None
    try:
        report = dump_corpus(
            args.url, args.corpus, model=args.model, hf_model=args.hf_model,
            extra_config=load_extra_config(args.config, args.set), manifest=args.manifest,
            text_field=args.text_field, tokens_field=args.tokens_field, id_field=args.id_field, chunk_size=chunk,
            save_unfull_chunk=unfull, engine_config=engine_config, dtype=args.dtype, world_size=args.world_size,
            worker_id=args.worker_id, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
            device=args.device, ray_address=args.ray, actors=args.actors, actor_cpus=args.actor_cpus,
            progress=None if update is None else lambda results: update(len(results)))
    finally:
        if update is not None:
            update.bar.close()
    if args.json:
        print_json({**report.to_dict(), "chunk_size": chunk, "save_unfull_chunk": unfull, "hash_seed": hash_seed()})
    else:
        print_table(("prompts", "failed", "tokens", "chunks", "written", "skipped", "GiB written", "seconds", "GiB/s",
                     "prompts/s", "tokens/s"),
                    [(report.prompts, report.failed, report.tokens, report.chunks, report.written, report.skipped,
                      f"{report.gib:.3f}", f"{report.seconds:.1f}", f"{report.gib_per_s:.3f}",
                      f"{report.prompts_per_s:.1f}", f"{report.tokens_per_s:.0f}")])
        if report.manifest:
            print(f"manifest: {report.manifest} ({human_bytes(report.bytes)} written)")
    for prompt_id, error in report.failures[:20]:
        print(f"kvstore: prompt {prompt_id}: {error}", file=sys.stderr)
    if report.failed > 20:
        print(f"kvstore: {report.failed - 20} more failed prompts: see the manifest", file=sys.stderr)
    return EXIT_FAILED if report.failed else 0

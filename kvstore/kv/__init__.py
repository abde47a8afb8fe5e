"""Offline KV dumping: write a model's KV cache into a store as the chunks LMCache reads.

``dump`` splits a prompt's KV cache into LMCache chunks, names each with the key the installed
LMCache computes for the same tokens, and writes its exact bytes; ``load`` / ``load_chunks``
read the longest cached prefix back, ``verify`` checks it, ``scan`` and ``gc`` manage what a
store holds (``gc`` never cuts a prompt's chain of chunks in the middle); ``dump_corpus`` dumps a
whole corpus, in one process or on Ray. torch and lmcache are imported only when these run.
"""

from kvstore.kv.copy import CopyReport, copy
from kvstore.kv.corpus import dump_corpus
from kvstore.kv.corpus_report import CorpusReport, PromptResult
from kvstore.kv.dump import DumpReport, dump
from kvstore.kv.gc import GCReport, gc
from kvstore.kv.inventory import ChunkInfo, parse_chunk_name, scan
from kvstore.kv.keys import ChunkKey, chunk_keys, hash_seed
from kvstore.kv.layout import KVLayout, chunk_metadata
from kvstore.kv.load import ChunkCheck, VerifyReport, load, load_chunks, verify

__all__ = [
    "ChunkCheck", "ChunkInfo", "ChunkKey", "CopyReport", "CorpusReport", "DumpReport", "GCReport", "KVLayout",
    "PromptResult", "VerifyReport", "chunk_keys", "chunk_metadata", "copy", "dump", "dump_corpus", "gc", "hash_seed",
    "load", "load_chunks", "parse_chunk_name", "scan", "verify",
]

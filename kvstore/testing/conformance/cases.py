"""The conformance cases: what every store must do, each a function of a store factory.

A case takes a ``factory`` (a callable returning a fresh ``KVStore`` under a fresh prefix),
raises ``Skip(reason)`` when it does not apply to the store, and ``AssertionError`` (or any other
exception) when the store misbehaves. Case ids are stable: reports and docs refer to them.

Cases that need another view of the same location (wrong credentials, another bucket, a dead
endpoint, a second writer without checksums) reopen the store from ``store.config``.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import kvstore
from kvstore.errors import BufferTooSmall, InvalidKey, PreconditionFailed
from kvstore.store import MAX_NAME_BYTES, KVStore

StoreFactory = Callable[[], KVStore]
MiB = 1024 * 1024
BIG_OBJECT = 64 * MiB
MANY_KEYS = 1050  # more than one ListObjectsV2 page of 1000


class Skip(Exception):
    """The case does not apply to this store; the message says why."""

    @property
    def reason(self) -> str:
        return str(self)


@dataclass(frozen=True)
class Case:
    """One named check. ``id`` never changes once published."""

    id: str
    run: Callable[[StoreFactory], None]
    doc: str


CASES: list[Case] = []


def case(case_id: str) -> Callable[[Callable[[StoreFactory], None]], Callable[[StoreFactory], None]]:
    def register(fn: Callable[[StoreFactory], None]) -> Callable[[StoreFactory], None]:
        if any(c.id == case_id for c in CASES):
            raise ValueError(f"duplicate conformance case id {case_id!r}")
        CASES.append(Case(case_id, fn, (fn.__doc__ or "").strip().splitlines()[0]))
        return fn

    return register


def case_by_id(case_id: str) -> Case:
    for c in CASES:
        if c.id == case_id:
            return c
    raise KeyError(f"no conformance case {case_id!r}; known: {', '.join(c.id for c in CASES)}")


# -- helpers -------------------------------------------------------------------------------------
def _random_bytes(size: int, seed: int | None = None) -> bytes:
    return random.Random(seed).randbytes(size)


def _roundtrip(store: KVStore, key: str, data: bytes) -> None:
    """put, then read back every way (get, get_into, stat, exists) and compare."""
    store.put(key, data)
    got = store.get(key)
    assert got is not None, f"{key!r}: get missed right after put"
    assert len(got) == len(data), f"{key!r}: get returned {len(got)} bytes, wrote {len(data)}"
    assert got == data, f"{key!r}: get returned different bytes"
    buffer = bytearray(len(data))
    assert store.get_into(key, buffer) == len(data), f"{key!r}: get_into returned a wrong size"
    assert buffer == data, f"{key!r}: get_into filled different bytes"
    info = store.stat(key)
    assert info is not None and info.size == len(data), f"{key!r}: stat says {info}"
    assert store.exists(key)


def _reopen(store: KVStore, **changes) -> KVStore:
    return kvstore.open_config(store.config.with_overrides(**changes))


def _needs_s3(store: KVStore, what: str) -> None:
    if not store.config.is_s3:
        raise Skip(f"{what} applies to S3 stores only (profile {store.config.profile!r})")


# -- object sizes --------------------------------------------------------------------------------
def _size_case(case_id: str, describe: str, size_of: Callable[[KVStore], int]) -> None:
    def run(factory: StoreFactory) -> None:
        with factory() as store:
            size = size_of(store)
            _roundtrip(store, f"size-{size}", _random_bytes(size, seed=size))

    run.__doc__ = describe
    case(case_id)(run)


_size_case("size-empty", "An empty object round-trips (get, get_into, stat).", lambda s: 0)
_size_case("size-1b", "A 1-byte object round-trips.", lambda s: 1)
_size_case("size-part-minus-1", "An object one byte under the part size round-trips.", lambda s: s.config.part_size - 1)
_size_case("size-part-plus-1", "An object one byte over the part size (multipart) round-trips.", lambda s: s.config.part_size + 1)
_size_case("size-64mib", "A 64 MiB object of random bytes round-trips.", lambda s: BIG_OBJECT)


# -- basic semantics -----------------------------------------------------------------------------
@case("overwrite")
def overwrite(factory: StoreFactory) -> None:
    """A second put replaces the object, also with a shorter value."""
    with factory() as store:
        store.put("k", _random_bytes(1000, 1))
        second = _random_bytes(100, 2)
        store.put("k", second)
        assert store.get("k") == second
        info = store.stat("k")
        assert info is not None and info.size == 100, f"stat after overwrite: {info}"


@case("miss")
def miss(factory: StoreFactory) -> None:
    """Reads of an absent key return None (get, get_into, stat, exists), never raise."""
    with factory() as store:
        assert store.get("absent") is None
        assert store.get_into("absent", bytearray(16)) is None
        assert store.stat("absent") is None
        assert store.exists("absent") is False


@case("delete-twice")
def delete_twice(factory: StoreFactory) -> None:
    """delete says True, then False; the object is gone."""
    with factory() as store:
        store.put("k", b"x")
        assert store.delete("k") is True
        assert store.delete("k") is False
        assert store.get("k") is None


@case("discard")
def discard(factory: StoreFactory) -> None:
    """discard and discard_many remove what is there and say nothing of what was not."""
    with factory() as store:
        store.put_many({"a": b"1", "b": b"2", "c": b"3"})
        assert store.discard("a") is None  # type: ignore[func-returns-value]  # the case checks it says nothing
        store.discard("absent")
        store.discard_many(["b", "absent", "c"])
        assert store.exists_many(["a", "b", "c"]) == [False, False, False]
        store.put("d", b"4")
        asyncio.run(store.adiscard_many(["d", "absent"]))
        assert store.get("d") is None


# -- listing -------------------------------------------------------------------------------------
def _needs_listing(store: KVStore) -> None:
    if not store.backend.capabilities.listing:
        raise Skip("the backend cannot list")


@case("list-prefixes")
def list_prefixes(factory: StoreFactory) -> None:
    """list(prefix) returns exactly the keys under a prefix, sorted, '/' or not."""
    with factory() as store:
        _needs_listing(store)
        keys = ["a/1", "a/2", "a/b/3", "a0", "ab", "b"]
        store.put_many({k: k.encode() for k in reversed(keys)})
        assert list(store.list()) == keys
        assert list(store.list("a/")) == ["a/1", "a/2", "a/b/3"]
        assert list(store.list("a")) == ["a/1", "a/2", "a/b/3", "a0", "ab"]
        assert list(store.list("a/b/")) == ["a/b/3"]
        assert list(store.list("zz")) == []
        sizes = {info.key: info.size for info in store.scan("a/")}
        assert sizes == {"a/1": 3, "a/2": 3, "a/b/3": 5}, f"scan sizes: {sizes}"


@case("scan-metadata")
def scan_metadata(factory: StoreFactory) -> None:
    """scan's metadata is the object's own or NOT_LISTED, never an empty mapping; stat reads it."""
    with factory() as store:
        _needs_listing(store)
        store.put("m", b"abc", {"dtype": "bf16"})
        [info] = list(store.scan())
        if info.metadata is not kvstore.NOT_LISTED:
            assert info.metadata.get("dtype") == "bf16", f"scan gave metadata {dict(info.metadata)}"
        else:
            try:
                info.metadata.get("dtype")
            except kvstore.KVStoreError:
                pass
            else:
                raise AssertionError("metadata NOT_LISTED read as a mapping")
        stat = store.stat("m")
        assert stat is not None and stat.metadata.get("dtype") == "bf16", f"stat gave {stat}"


@case("list-start-after")
def list_start_after(factory: StoreFactory) -> None:
    """list(start_after=k) leaves out every key up to k, a key or not, as S3's start-after does."""
    with factory() as store:
        _needs_listing(store)
        keys = ["a/1", "a/2", "a/b/3", "a0", "ab", "b"]
        store.put_many({k: k.encode() for k in reversed(keys)})
        assert list(store.list(start_after="a/2")) == ["a/b/3", "a0", "ab", "b"]
        assert list(store.list(start_after="a/")) == keys
        assert list(store.list(start_after="a/10")) == keys[1:]
        assert list(store.list("a/", start_after="a/1")) == ["a/2", "a/b/3"]
        assert list(store.list(start_after="b")) == []


# Names where a "directory" and a sibling share a stem: S3 sorts '-' and '.' before '/'.
_ORDER_KEYS = ["a-x", "a.y", "a/1", "a/b/2", "a0"]


@case("list-order")
def list_order(factory: StoreFactory) -> None:
    """Keys come in S3's order, UTF-8 bytes: 'a-x' and 'a.y' before 'a/1', 'a0' after it."""
    with factory() as store:
        _needs_listing(store)
        store.put_many({k: b"" for k in reversed(_ORDER_KEYS)})
        listed = list(store.list())
        assert listed == _ORDER_KEYS, f"listed in the order {listed}"


@case("list-resume")
def list_resume(factory: StoreFactory) -> None:
    """A listing resumed after any key it gave (start_after) gives exactly the keys that followed it.

    This is how a failed page is retried, so the retry neither skips nor repeats a key, in
    whatever order the server lists.
    """
    with factory() as store:
        _needs_listing(store)
        store.put_many({k: b"" for k in reversed(_ORDER_KEYS)})
        listed = list(store.list())
        assert sorted(listed) == _ORDER_KEYS, f"listed {listed}"
        for i, key in enumerate(listed):
            rest = list(store.list(start_after=key))
            assert rest == listed[i + 1:], f"after {key!r}: {rest}, but the listing went on with {listed[i + 1:]}"


@case("list-over-1000")
def list_over_1000(factory: StoreFactory) -> None:
    """Listing returns every key when there are more than one page (1000) of them."""
    with factory() as store:
        _needs_listing(store)
        keys = [f"many/{i:05d}" for i in range(MANY_KEYS)]
        store.put_many((k, b"") for k in keys)
        store.put("other", b"")
        listed = list(store.list("many/"))
        assert len(listed) == len(keys), f"listed {len(listed)} keys of {len(keys)}"
        assert listed == keys
        assert list(store.list("many/", start_after=keys[999])) == keys[1000:]
        first = store.list("many/")  # a listing left after one key is closed, not drained
        assert next(first) == keys[0]
        first.close()
        # delete_many's per-key answers are batch-mixed's; here one request per 1000 keys will do.
        store.discard_many(keys)
        assert list(store.list()) == ["other"]


# -- batches -------------------------------------------------------------------------------------
@case("batch-mixed")
def batch_mixed(factory: StoreFactory) -> None:
    """get_many, exists_many, get_into_many and delete_many keep order across hits and misses."""
    with factory() as store:
        values = {f"hit-{i}": _random_bytes(100 + i, i) for i in range(4)}
        store.put_many(values)
        keys = ["hit-0", "miss-0", "hit-1", "hit-2", "miss-1", "hit-3"]
        expected = [values.get(k) for k in keys]
        assert store.get_many(keys) == expected
        assert store.exists_many(keys) == [v is not None for v in expected]
        buffers = [bytearray(200) for _ in keys]
        sizes = store.get_into_many(keys, buffers)
        assert sizes == [None if v is None else len(v) for v in expected]
        for buffer, value in zip(buffers, expected):
            if value is not None:
                assert buffer[: len(value)] == value
        assert store.delete_many(keys) == [v is not None for v in expected]
        assert store.exists_many(keys) == [False] * len(keys)
        assert store.get_many([]) == [] and store.delete_many([]) == []


@case("batch-repeats")
def batch_repeats(factory: StoreFactory) -> None:
    """A key twice in one batch: put_many refuses before writing, delete_many says True for its first only."""
    with factory() as store:
        store.put("d", b"1")  # the store exists: the reads below find misses, not a missing root
        try:
            store.put_many([("twice", b"first"), ("once", b"x"), ("twice", b"second")])
        except ValueError:
            pass
        else:
            raise AssertionError("put_many stored a batch naming one key twice")
        assert store.get_many(["twice", "once"]) == [None, None], "a refused batch wrote something"
        try:
            asyncio.run(store.aput_many([("twice", b"a"), ("twice", b"b")]))
        except ValueError:
            pass
        else:
            raise AssertionError("aput_many stored a batch naming one key twice")
        assert store.delete_many(["d", "absent", "d"]) == [True, False, False]
        store.put("d", b"1")
        assert asyncio.run(store.adelete_many(["d", "d"])) == [True, False]
        store.discard_many(["d", "d"])


# -- concurrency ---------------------------------------------------------------------------------
@case("concurrent-one-key")
def concurrent_one_key(factory: StoreFactory) -> None:
    """Readers racing writers on one key see a whole old or a whole new value, never a mix."""
    with factory() as store:
        size = min(store.config.part_size, 8 * MiB) + 1  # crosses a part: ranged reads could tear
        values = [_random_bytes(size, seed) for seed in range(4)]
        allowed = set(values)
        store.put("k", values[0])
        done = threading.Event()
        problems: list[str] = []
        reads = [0]

        def write(offset: int) -> None:
            for i in range(3):
                store.put("k", values[(offset + i) % len(values)])

        def read(into: bool) -> None:
            buffer = bytearray(size)
            while not done.is_set() or reads[0] < 4:
                if into:
                    n = store.get_into("k", buffer)
                    got = None if n is None else bytes(buffer[:n])
                else:
                    got = store.get("k")
                reads[0] += 1
                if got not in allowed:
                    problems.append("a miss" if got is None else f"a torn value of {len(got)} bytes")
                    return

        def guarded(target: Callable[..., None], *args: object) -> threading.Thread:
            def body() -> None:
                try:
                    target(*args)
                except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
                    problems.append(f"{type(exc).__name__}: {exc}")
            return threading.Thread(target=body)

        readers = [guarded(read, i % 2 == 1) for i in range(3)]
        writers = [guarded(write, i) for i in range(2)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join()
        done.set()
        for t in readers:
            t.join()
        assert not problems, f"after {reads[0]} reads: {problems[0]}"


# -- get_into buffers ----------------------------------------------------------------------------
@case("get-into-buffers")
def get_into_buffers(factory: StoreFactory) -> None:
    """get_into fills exact and larger buffers (the rest untouched) and refuses small ones."""
    with factory() as store:
        data = _random_bytes(4096, 7)
        store.put("k", data)
        exact = bytearray(len(data))
        assert store.get_into("k", exact) == len(data) and exact == data
        larger = bytearray(b"\xaa" * (len(data) + 100))
        assert store.get_into("k", memoryview(larger)) == len(data)
        assert larger[: len(data)] == data and larger[len(data):] == b"\xaa" * 100, "bytes past the object were written"
        small = bytearray(len(data) - 1)
        try:
            store.get_into("k", small)
        except BufferTooSmall as exc:
            assert exc.needed == len(data) and exc.given == len(data) - 1, f"BufferTooSmall says {exc}"
        else:
            raise AssertionError("get_into into a too-small buffer did not raise BufferTooSmall")


# -- keys ----------------------------------------------------------------------------------------
def _key_case(case_id: str, describe: str, make_key: Callable[[KVStore], str]) -> None:
    def run(factory: StoreFactory) -> None:
        with factory() as store:
            key = make_key(store)
            data = key.encode("utf-8")[:64] + b"!"
            _roundtrip(store, key, data)
            if store.backend.capabilities.listing:
                listed = list(store.list())
                assert listed == [key], f"list shows {listed!r}, wrote {key!r}"
            assert store.delete(key) is True
            assert store.get(key) is None

    run.__doc__ = describe
    case(case_id)(run)


@case("key-odd-slashes")
def key_odd_slashes(factory: StoreFactory) -> None:
    """Keys with empty, '.' or '..' segments are refused up front with InvalidKey, on every backend."""
    with factory() as store:
        for key in ("a//b", "dir/", "/lead", "a/./b", "../up"):
            try:
                store.put(key, b"x")
            except InvalidKey:
                continue
            raise AssertionError(f"{key!r} was accepted")
        if store.backend.capabilities.listing:
            assert list(store.list()) == [], f"list shows {list(store.list())!r}"


def _longest_key(store: KVStore) -> str:
    """A key whose object name (prefix included) is exactly the 1024-byte limit.

    Segments stay under 255 bytes: servers that keep objects as files (SeaweedFS) cap a path
    segment there, as LMCache's own key names never reach.
    """
    prefix_bytes = len(store.name_of("x").encode("utf-8")) - 1
    body = ["x"] * (MAX_NAME_BYTES - prefix_bytes - 2)
    for i in range(200, len(body) - 1, 201):
        body[i] = "/"
    body[-1] = "z"
    return "k/" + "".join(body)


_key_case("key-unicode", "Keys with non-ASCII characters round-trip and list.", lambda s: "ключ/キー/🔑-é")
_key_case("key-spaces", "Keys with spaces round-trip and list.", lambda s: "a key with  spaces ")
_key_case("key-percent", "Keys with '%' (and what looks like escapes) round-trip.", lambda s: "100% %2F %zz%")
_key_case("key-plus", "Keys with '+' round-trip (not read back as spaces).", lambda s: "a+b +c")
_key_case("key-slashes", "Keys with '/' round-trip and list.", lambda s: "dir/sub/obj")
_key_case("key-1kib", "A key filling the 1 KiB object-name limit round-trips.", _longest_key)


# -- metadata and isolation ----------------------------------------------------------------------
@case("metadata")
def metadata(factory: StoreFactory) -> None:
    """User metadata round-trips through put and stat."""
    with factory() as store:
        if not store.backend.capabilities.metadata:
            raise Skip("the backend keeps no metadata")
        meta = {"model": "llama-3-8b", "chunk-hash": "0123abcd", "fmt-ver": "2"}
        store.put("k", b"data", meta)
        info = store.stat("k")
        assert info is not None
        got = {k: v for k, v in info.metadata.items() if k in meta}
        assert got == meta, f"stat metadata {dict(info.metadata)}"
        assert store.get("k") == b"data"


@case("read-with-info")
def read_with_info(factory: StoreFactory) -> None:
    """get_into(info=True) and aget_into(info=True) hand back the size and the user metadata stat sees,
    from the read itself."""
    with factory() as store:
        if not store.backend.capabilities.metadata:
            raise Skip("the backend keeps no metadata")
        meta = {"model": "llama-3-8b", "fmt-ver": "2"}
        data = _random_bytes(3000, 5)
        store.put("k", data, meta)
        buffer = bytearray(4096)
        info = store.get_into("k", buffer, info=True)
        assert info is not None and info.key == "k" and info.size == len(data), info
        assert bytes(buffer[: len(data)]) == data
        assert {k: v for k, v in info.metadata.items() if k in meta} == meta, f"metadata {dict(info.metadata)}"
        assert store.get_into("absent", buffer, info=True) is None
        again = asyncio.run(store.aget_into("k", bytearray(4096), info=True))
        assert again is not None and again.size == len(data) and dict(again.metadata) == dict(info.metadata)


@case("prefix-isolation")
def prefix_isolation(factory: StoreFactory) -> None:
    """Two stores with different prefixes never see each other's objects."""
    with factory() as one, factory() as two:
        one.put("k", b"one")
        two.put("k", b"two")
        assert one.get("k") == b"one" and two.get("k") == b"two"
        if one.backend.capabilities.listing:
            assert list(one.list()) == ["k"] and list(two.list()) == ["k"]
        assert one.delete("k") is True
        assert two.get("k") == b"two"
        assert one.delete("k") is False


@case("conditional-put")
def conditional_put(factory: StoreFactory) -> None:
    """put(if_absent=True) stores once, then raises PreconditionFailed and keeps the first value."""
    with factory() as store:
        if not store.backend.capabilities.conditional_put:
            raise Skip("the backend declares no conditional put")
        store.put("k", b"first", if_absent=True)
        try:
            store.put("k", b"second", if_absent=True)
        except PreconditionFailed:
            pass
        else:
            raise AssertionError("a second put(if_absent=True) did not raise PreconditionFailed")
        assert store.get("k") == b"first"


@case("async-roundtrip")
def async_roundtrip(factory: StoreFactory) -> None:
    """aput, aget, aget_into, aexists, alist, ascan and adelete work on the caller's event loop."""

    async def run(store: KVStore) -> None:
        data = _random_bytes(1000, 3)
        await store.aput("a/k", data)
        assert await store.aget("a/k") == data
        buffer = bytearray(len(data))
        assert await store.aget_into("a/k", buffer) == len(data) and buffer == data
        assert await store.aexists("a/k") is True
        assert await store.aget("absent") is None
        if store.backend.capabilities.listing:
            assert [k async for k in store.alist("a/")] == ["a/k"]
            assert [(i.key, i.size) async for i in store.ascan("a/")] == [("a/k", len(data))]
        assert await store.adelete("a/k") is True

    with factory() as store:
        asyncio.run(run(store))


# The error and integrity cases live in their own module; importing it registers them here.
from kvstore.testing.conformance import errors as _errors  # noqa: E402,F401


def iter_cases(ids: list[str] | None = None) -> Iterator[Case]:
    """The cases to run: all of them, or those named, in registration order."""
    if not ids:
        yield from CASES
        return
    wanted = [case_by_id(i).id for i in ids]
    yield from (c for c in CASES if c.id in wanted)

"""Regenerate docs/conformance.md: run the conformance matrix, then render it with the fixed text.

    python scripts/gen_conformance_doc.py            # runs tests/test_conformance.py (a few minutes)
    python scripts/gen_conformance_doc.py --from FILE  # renders a matrix JSON written earlier by
                                                       # pytest ... --kvstore-matrix FILE
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "conformance.md"
PLUGIN = "kvstore.testing.conformance.plugin"
SYMBOL = {"pass": "✓", "fail": "✗", "skip": "–"}

INTRO = """\
# Conformance

`kvstore.testing.conformance` is one set of checks that every store must pass, whatever the
backend (crt, obstore, fsspec, file, memory) and whatever the server. Each case has a stable id;
a case that does not apply (a backend without conditional put, credentials that are not static,
a store that is not S3) is skipped with the reason. Every run writes under a fresh random prefix
(`<prefix>/kvstore-conformance-<random>/`) and deletes what it wrote.

## Running it

```sh
kvstore conformance URL [-c FILE] [--set key=value] [-k CASE] [--json FILE | --junit FILE]
pytest --pyargs kvstore.testing.conformance --kvstore-url URL [--kvstore-config FILE] [--kvstore-set k=v]
```

The command prints one row per case and exits 1 when any case fails (`failing cases:` names
them on stderr), 0 otherwise. `kvstore conformance --list` lists the cases. A backend's own
tests can run the cases with their own store factory:

```python
from kvstore.testing.conformance import CASES, check

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_conformance(case, my_factory):  # my_factory() -> a fresh KVStore under a fresh prefix
    check(case, my_factory)
```
"""

QUIRKS = """\
## Server quirks the matrix runs into

- **moto** accepts any credentials unless started with authentication enforced (the test servers
  are; otherwise `error-auth` fails because nothing is refused). It has no S3 Express
  (`CreateSession`): the S3 Express cells run through a test gateway that implements session auth
  in front of moto. The CRT takes the gateway as its endpoint; obstore and botocore (fsspec) go to
  AWS's zonal host themselves, so they reach the gateway as their HTTPS proxy (`s3_proxy_url`),
  over TLS checked against a throwaway CA (`s3_ca_bundle`), on the real `s3express` profile.
  With authentication on it rejects query strings that are not percent-encoded
  (`prefix=a%2F`), which is what `key-*` and `list-prefixes` catch in a client that forgets to.
- **SeaweedFS** keeps a prefix in `CommonPrefixes` after all its keys are deleted, and does not
  reclaim deleted space. kvstore lists without a delimiter, so listings stay exact.
- **Ceph RGW** answers `CompleteMultipartUpload` with an empty ETag (HEAD has the right one) and
  ignores `If-None-Match` on Complete: a conditional put of a multipart-sized object is not
  enforced there. `size-part-plus-1` and `concurrent-one-key` exercise the multipart path.
- **s3rver** (npm 3.7.1, Node.js; installed into `.test-servers/` by `make test`) is the matrix's
  JavaScript implementation. Its XML carries the namespace URI `http://doc.s3.amazonaws.com/2006-03-01/`
  (not AWS's), and it answers a ranged GET of the empty object with `206` and
  `Content-Range: bytes 0-0/0` (plus `Content-Length: 1` and no body): both are quirks kvstore must
  handle, so `list-*`, `size-empty` and every listing case stay on. Its continuation tokens are
  DES-encrypted, which OpenSSL 3 keeps in its legacy provider: without `--openssl-legacy-provider`
  (the harness sets it) every listing of more than one page is a 500. Its `DeleteObjects` deletes
  the keys in parallel and can answer 500 after deleting them all (the removal of an emptied
  "directory" races), which a retried `delete_many` must not report as "was not there".
  `ListMultipartUploads` is not implemented. What it does not implement at all is below.
- **Upload checksums.** SeaweedFS validates `x-amz-checksum-crc32c` and refuses a body damaged on
  the way (`BadDigest`); moto (and the S3 Express gateway in front of it) stores what it receives;
  Ceph RGW and s3rver are not tested for it. crt and fsspec send the checksum, obstore cannot
  (see [Reliability](reliability.md#the-server-verifies-what-we-upload)).
- **Virtual-hosted addressing** on loopback needs `bucket.localhost` names to resolve; where they
  do not, the `-virtual` cells skip. s3rver takes `bucket.s3.localhost` (it reads `bucket.localhost`
  as a bucket named `bucket.localhost`).
"""


def render_limits() -> list[str]:
    """The per-server limits (kvstore.testing.servers.known_limits): what skips, and why."""
    from kvstore.testing.servers import SERVER_NAMES, known_limits

    lines = ["## What a server does not implement", "",
             "Declared as data per server (`known_limits`); the cases named skip on that server with the reason "
             "beside them, and `tests/test_servers.py::test_declared_limits_are_real` fails once the server "
             "learns the feature.", "",
             "| server | does not implement | cases that skip |", "|---|---|---|"]
    for name in SERVER_NAMES:
        for limit in known_limits(name):
            lines.append(f"| {name} | {limit.what} | " + ", ".join(f"`{c}`" for c in limit.cases) + " |")
    return lines

RECIPES = """\
## Recipes for real endpoints

Every recipe writes a few hundred objects (one of 64 MiB) under a random prefix and deletes
them; give it a bucket you may write to.

**AWS S3** (credentials from the usual AWS chain):

```sh
kvstore conformance s3://my-bucket/conformance --set s3_region=us-east-1
```

**S3 Express One Zone** (a directory bucket; run it from an instance in the same zone):

```sh
kvstore conformance s3://my-cache--use1-az4--x-s3/conformance
```

**CoreWeave AI Object Storage** (virtual-hosted addressing, 16 MiB parts):

```sh
kvstore conformance s3://my-bucket/conformance --set kvstore_profile=coreweave \\
    --set aws_access_key_id=$CW_ACCESS_KEY --set aws_secret_access_key=$CW_SECRET_KEY
```

**MinIO** (self-hosted, path-style):

```sh
kvstore conformance s3://my-bucket/conformance --set s3_endpoint_url=http://minio.internal:9000 \\
    --set aws_access_key_id=$MINIO_ACCESS_KEY --set aws_secret_access_key=$MINIO_SECRET_KEY
```

Keep secrets out of shell history with `-c FILE` (a YAML file of the same keys). For CI, add
`--junit report.xml`.
"""


def run_matrix(path: Path) -> None:
    """Run tests/test_conformance.py with the plugin writing the matrix JSON to ``path``."""
    loaded = any(ep.value == PLUGIN for ep in metadata.entry_points(group="pytest11"))
    command = [sys.executable, "-m", "pytest", "tests/test_conformance.py", "-k", "test_conformance", "-q",
               "--kvstore-matrix", str(path), *([] if loaded else ["-p", PLUGIN])]
    subprocess.run(command, cwd=ROOT, check=False)
    if not path.exists():
        sys.exit("the matrix run wrote no results")


def render(grid: dict[str, dict[str, dict[str, str]]]) -> str:
    from kvstore.testing.conformance import CASES

    targets = list(grid)
    lines = [INTRO, "## Cases", "", "| case | checks |", "|---|---|"]
    lines += [f"| `{c.id}` | {c.doc} |" for c in CASES]
    lines += ["", "## The latest matrix", "",
              f"{SYMBOL['pass']} pass, {SYMBOL['fail']} fail, {SYMBOL['skip']} skipped (reasons below). "
              "Targets: backend-server[-addressing].", "",
              "| case | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for c in CASES:
        cells = [SYMBOL.get(grid[t].get(c.id, {}).get("outcome", ""), " ") for t in targets]
        lines.append(f"| `{c.id}` | " + " | ".join(cells) + " |")
    notes = {}
    for t in targets:
        for case_id, cell in grid[t].items():
            if cell["outcome"] != "pass" and cell["detail"]:
                notes.setdefault((cell["outcome"], cell["detail"]), []).append(f"{t}/{case_id}")
    if notes:
        lines += ["", "### Skips and failures", ""]
        for (outcome, detail), where in sorted(notes.items()):
            shown = ", ".join(where[:6]) + (f" and {len(where) - 6} more" if len(where) > 6 else "")
            lines.append(f"- {outcome}: {detail} ({shown})")
    lines += ["", *render_limits()]
    return "\n".join(lines) + "\n\n" + QUIRKS + "\n" + RECIPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", metavar="FILE", help="render this matrix JSON instead of running")
    args = parser.parse_args()
    if args.source:
        grid = json.loads(Path(args.source).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "matrix.json"
            run_matrix(path)
            grid = json.loads(path.read_text())
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(grid))
    print(f"wrote {DOC.relative_to(ROOT)} ({len(grid)} targets)")


if __name__ == "__main__":
    main()

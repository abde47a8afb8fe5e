"""moto: ``python -m moto.server`` in its own process (not in-process: a client benchmark must not share
the GIL with the server).  With ``auth=True`` SigV4 is enforced using keys made through moto's IAM API."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
import time

from kvstore.testing.servers.endpoint import S3Server, _signed_probe, boto3_missing, raise_if_unavailable
from kvstore.testing.servers.net import DEFAULT_REGION, LOOPBACK, _http_status, free_port
from kvstore.testing.servers.process import ManagedServer, _with_port_retry

__all__ = ["MotoServer", "moto_missing", "start_moto"]

START_TIMEOUT = 60.0  # seconds; generous: the test machine has two busy cores


def moto_missing() -> str | None:
    """None when the moto server can run here (boto3 aside), else why not."""
    missing = [m for m in ("moto", "flask", "flask_cors") if importlib.util.find_spec(m) is None]
    if missing:
        return f"moto server needs {', '.join(missing)}: pip install 'moto[s3]' flask flask-cors"
    return None


class MotoServer(ManagedServer):
    """``python -m moto.server`` in its own process.

    With auth, moto accepts any request until the IAM user and key are made (the env var
    INITIAL_NO_AUTH_ACTION_COUNT is set high), then ``/moto-api/reset-auth`` turns SigV4
    checking on for every later request.  ``/moto-api/seed`` first makes moto's random generator,
    hence the IAM keys, the same on every restart.

    moto keeps everything in memory: a restart loses the objects unless ``persist=True``, which
    turns on moto's request recorder (every request, bodies included, is appended to a file in
    the state directory; costly for benchmarks) and replays it after the restart.
    """

    name = "moto"

    def __init__(self, *, auth: bool, persist: bool, start_timeout: float):
        super().__init__(start_timeout=start_timeout)
        self.auth = auth
        self.persist = persist
        self.restart_keeps_data = persist
        self.port = free_port()
        self._seed = random.randrange(1, 2**31)
        self._boot()

    def _launch_frontend(self, timeout: float, first: bool) -> None:
        deadline = time.monotonic() + timeout
        env = dict(os.environ)
        env.pop("MOTO_ENABLE_RECORDING", None)
        env["MOTO_RECORDER_FILEPATH"] = str(self.workdir / "moto_recording.jsonl")
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "1000000000"  # no auth until reset-auth below
        env.setdefault("AWS_DEFAULT_REGION", DEFAULT_REGION)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]
        self._front = self._spawn(cmd, "moto.log", env=env, cwd=self.workdir)
        # Werkzeug prints this once it has bound the port.
        self._wait_for_banner("moto listening", "moto.log", f"Running on http://{LOOPBACK}:{self.port}".encode(),
                              deadline)

        base = f"http://{LOOPBACK}:{self.port}"
        self._moto_api(f"{base}/moto-api/seed?a={self._seed}")
        if self.auth:
            access_key, secret_key = self._make_iam_key(base)
            self._moto_api(f"{base}/moto-api/reset-auth", data=b"0")
        else:
            access_key, secret_key = "testing", "testing"
        server = S3Server.on_loopback("moto", self.port, access_key, secret_key)
        if self.server is not None and self.server != server:
            raise self._fail(f"restart produced different credentials ({server} != {self.server})")
        self.server = server
        if self.persist:
            if not first:
                self._moto_api(f"{base}/moto-api/recorder/replay-recording", method="GET", timeout=600)
            self._moto_api(f"{base}/moto-api/recorder/start-recording", method="GET")
        self._wait("moto signed request", _signed_probe(server), deadline, [self._front], 0.1)

    def _moto_api(self, url: str, data: bytes | None = b"", method: str = "POST", timeout: float = 30) -> None:
        try:
            status = _http_status(url, method=method, data=data if method == "POST" else None, timeout=timeout)
        except OSError as e:
            raise self._fail(f"{url}: {e}") from e
        if status != 200:
            raise self._fail(f"{url}: HTTP {status}")

    def _make_iam_key(self, base: str) -> tuple[str, str]:
        import boto3

        iam = boto3.session.Session().client(
            "iam",
            endpoint_url=base,
            region_name=DEFAULT_REGION,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        try:
            iam.create_user(UserName="kvstore")
            iam.put_user_policy(
                UserName="kvstore",
                PolicyName="kvstore-all",
                PolicyDocument=json.dumps(
                    {"Version": "2012-10-17",
                     "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
                ),
            )
            key = iam.create_access_key(UserName="kvstore")["AccessKey"]
        except Exception as e:
            raise self._fail(f"creating the IAM user failed: {e!r}") from e
        return key["AccessKeyId"], key["SecretAccessKey"]


def start_moto(*, auth: bool = True, persist: bool = False, timeout: float | None = None) -> ManagedServer:
    """moto_server in a subprocess on a free port.  ``auth=True`` enforces SigV4 with IAM-made keys;
    with ``auth=False`` any keys are accepted (the server's are testing/testing)."""
    raise_if_unavailable(boto3_missing() or moto_missing())
    return _with_port_retry(
        lambda: MotoServer(auth=auth, persist=persist, start_timeout=timeout or START_TIMEOUT)
    )


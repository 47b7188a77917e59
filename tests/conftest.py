"""Shared test configuration: hypothesis runs are deterministic.

``derandomize`` derives each test's examples from its source, and no example database is
kept, so a run replays exactly; set HYPOTHESIS_PROFILE=explore to search with fresh seeds.

Fixtures: an S3-compatible server (moto) on 127.0.0.1 for the S3 tests.
"""

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "deterministic",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

# The compiled lattice kernels from the first value (a process otherwise codes its first
# 2**25 values with numpy, the same bytes): the suite's small archives then run on them.
# tests/test_kernels.py switches between the paths itself.
os.environ.setdefault("MEDUSTORE_KERNELS", "numba")


# ---------------------------------------------------------------------------- fixtures


S3_BUCKET = "medustore-tests"
S3_CREDENTIALS = {"access_key_id": "test", "secret_access_key": "test", "region": "us-east-1"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3-compatible server (moto) on 127.0.0.1 for the session: its endpoint URL.

    Fails (never skips) when moto's server is not installed: the S3 tests are part of the
    suite.
    """
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.fail("the S3 tests need moto's server (the `moto_server` command): install "
                    "it with `pip install 'moto[server]>=5'` (or `pip install -e '.[test]'`)",
                    pytrace=False)
    port = _free_port()
    log = Path(tmp_path_factory.mktemp("moto")) / "moto_server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
    try:
        for _ in range(600):  # a start-up guard: up to a minute
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode}: "
                            f"{log.read_text()[-2000:]}", pytrace=False)
            try:
                with direct.open(url + "/moto-api/", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"moto_server did not answer on {url}: {log.read_text()[-2000:]}",
                        pytrace=False)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str):
    """A boto3 client of the test server, with the test bucket created."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket=S3_BUCKET)
    return client


@pytest.fixture
def s3_archive(s3_client, s3_endpoint: str, request: pytest.FixtureRequest
               ) -> tuple[str, dict]:
    """``(location, storage_options)`` of a fresh prefix of the test bucket (one per test)."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name).strip("-")
    options = {"endpoint_url": s3_endpoint, "allow_http": True, "force_path_style": True,
               **S3_CREDENTIALS}
    return f"s3://{S3_BUCKET}/{name}", options

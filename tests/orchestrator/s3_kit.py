"""A real S3 API server for tests: moto's standalone server on a loopback port, in this process
(`ThreadedMotoServer`), reached over HTTP with boto3 exactly as the orchestrator reaches AWS or
MinIO. The `s3` and `s3_bucket` fixtures (conftest.py) hand it out."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# moto accepts any credentials; boto3's default chain (what the orchestrator uses) reads these.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def new_bucket(self) -> str:
        """A fresh, empty bucket, so tests sharing the server never see each other's blobs."""
        name = f"dippy-test-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str, prefix: str = "blobs") -> dict[str, str]:
        """What an orchestrator process needs to keep its blobs in `bucket`."""
        return {
            **CREDENTIALS,
            "DIPPY_ORCH_BLOB_URL": f"s3://{bucket}/{prefix}",
            "DIPPY_ORCH_S3_ENDPOINT_URL": self.endpoint_url,
        }


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()

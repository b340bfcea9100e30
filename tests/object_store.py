"""An S3 API server on 127.0.0.1 for the tests of inputs and outputs named by ``s3://`` URIs.

moto's server is a separate HTTP server that speaks S3's REST API; raytrieve reaches it through
pyarrow's own S3 client, exactly as it reaches AWS. ``uri`` names the endpoint and the keys in
the URI itself, so Ray workers started before the server (whose environment holds no ``AWS_*``
variables) reach it too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

BUCKET = "raytrieve-test"
KEY, SECRET = "test", "not-a-real-secret"  # moto takes any keys


@dataclass
class S3Store:
    fs: pafs.S3FileSystem
    endpoint: str  # host:port

    def put(self, local: Path, key: str) -> str:
        """``local`` (a file, or a folder's tree) at ``s3://BUCKET/key``; that URI."""
        pafs.copy_files(str(local), f"{BUCKET}/{key}", destination_filesystem=self.fs)
        return f"s3://{BUCKET}/{key}"

    def uri(self, key: str) -> str:
        """``s3://BUCKET/key`` with the credentials, endpoint and region in it: opens anywhere."""
        return f"s3://{KEY}:{SECRET}@{BUCKET}/{key}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"


@contextlib.contextmanager
def s3_server() -> Iterator[S3Store]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"{host}:{port}"
        fs = pafs.S3FileSystem(access_key=KEY, secret_key=SECRET, region="us-east-1", scheme="http",
                               endpoint_override=endpoint, allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield S3Store(fs, endpoint)
    finally:
        server.stop()

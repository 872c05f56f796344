"""Where bytes live: a local folder or any S3-compatible bucket, behind one pyarrow filesystem.

``StorageConfig.filesystem()`` resolves a URI such as ``/data/store``, ``runs/store`` or
``s3://bucket/prefix`` to ``(pyarrow FileSystem, path)``. S3 endpoints other than AWS (MinIO, Ceph,
a moto server in tests) are set with ``s3_endpoint``; credentials come from the usual
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` environment variables.
"""

from __future__ import annotations

import io
import os
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import Field

from astra.config import FrozenModel


class StorageConfig(FrozenModel):
    uri: str = Field("runs/store", description="Local folder or s3://bucket/prefix.")
    s3_endpoint: str | None = Field(
        None,
        description="S3-compatible endpoint URL, e.g. http://127.0.0.1:9000 (None: AWS, or $AWS_ENDPOINT_URL).",
    )
    s3_region: str = Field("us-east-1", description="S3 region.")

    def filesystem(self, uri: str | None = None) -> tuple[pafs.FileSystem, str]:
        """(filesystem, path) of ``uri`` (default: this config's own uri) with these S3 settings."""
        return resolve(uri or self.uri, self.s3_endpoint, self.s3_region)

    def read_bytes(self, uri: str) -> bytes:
        """The whole object / file at ``uri`` (local path or s3://)."""
        fs, path = self.filesystem(uri)
        with fs.open_input_stream(path) as fh:
            return fh.read()

    def open_binary(self, uri: str) -> io.BufferedIOBase:
        """A seekable binary file: the file itself for local paths, an in-memory copy of remote objects."""
        fs, path = self.filesystem(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            return open(path, "rb")  # the caller closes it
        return io.BytesIO(self.read_bytes(uri))


def resolve(
    uri: str, s3_endpoint: str | None = None, s3_region: str = "us-east-1"
) -> tuple[pafs.FileSystem, str]:
    """URI -> (filesystem, path inside it)."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict = {"region": s3_region}
        if endpoint:
            ep = urlparse(endpoint)
            if not ep.netloc:
                raise ValueError(f"s3_endpoint: expected a URL such as http://host:port, got {endpoint!r}")
            kwargs |= {"endpoint_override": ep.netloc, "scheme": ep.scheme or "https"}
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"uri: unsupported scheme '{parsed.scheme}' in {uri!r} (use a local path or s3://)")
    path = parsed.path if parsed.scheme == "file" else uri
    return pafs.LocalFileSystem(), os.path.abspath(path)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole object so readers see either nothing or everything: a temp file renamed into
    place locally (rename is atomic on one filesystem); a single PUT on S3 (objects appear whole)."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as fh:
            fh.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as fh:
            fh.write(data)

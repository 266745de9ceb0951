"""URIs to files through pyarrow's filesystems: local paths, file://, s3://, gs://, ...

Local paths are made absolute, so a URI means the same thing in every Ray worker.
A query string (e.g. `?endpoint_override=...` for an S3-compatible server) is kept and
re-applied to every file found under it.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs


def _has_scheme(uri: str) -> bool:
    head = uri.split("/", 1)[0]
    return head.endswith(":") and len(head) > 2


def normalize(uri: str) -> str:
    """Absolute local path, or the URI unchanged."""
    uri = str(uri)
    if _has_scheme(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str
    scheme: str  # "" for local
    query: str  # "" or "?..."

    def uri_for(self, path: str) -> str:
        """The URI of another path on the same filesystem."""
        if not self.scheme:
            return path
        return f"{self.scheme}://{path}{self.query}"


def resolve(uri: str) -> Location:
    uri = normalize(uri)
    if not _has_scheme(uri):
        return Location(pafs.LocalFileSystem(), uri, "", "")
    scheme = uri.split(":", 1)[0]
    query = "?" + uri.split("?", 1)[1] if "?" in uri else ""
    if scheme == "file":
        return Location(pafs.LocalFileSystem(), uri[len("file://"):].split("?", 1)[0], "", "")
    fs, path = pafs.FileSystem.from_uri(uri)
    return Location(fs, path, scheme, query)


def join(uri: str, *parts: str) -> str:
    """Append path parts to a URI (keeping any query string at the end)."""
    uri = normalize(uri)
    base, query = (uri.split("?", 1) + [""])[:2]
    joined = posixpath.join(base.rstrip("/"), *parts)
    return f"{joined}?{query}" if query else joined


def read_bytes(uri: str) -> bytes:
    loc = resolve(uri)
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; on local disks via a temporary name and rename (never half-written)."""
    loc = resolve(uri)
    parent = posixpath.dirname(loc.path)
    if parent:
        loc.fs.create_dir(parent, recursive=True)
    if loc.scheme:
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
        return
    tmp = f"{loc.path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, loc.path)


def is_file(uri: str) -> bool:
    loc = resolve(uri)
    return loc.fs.get_file_info(loc.path).type == pafs.FileType.File


def exists(uri: str) -> bool:
    loc = resolve(uri)
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def lance_location(uri: str) -> tuple[str, dict[str, str] | None]:
    """(URI for Lance, Lance storage options): the query string of an object-store URI (pyarrow
    style, e.g. `?endpoint_override=host:9000&scheme=http&region=us-east-1`) becomes Lance's
    options. Credentials never travel in URIs: Lance reads them from the usual AWS_* variables."""
    uri = normalize(uri)
    if "?" not in uri or not _has_scheme(uri):
        return uri, None
    base, query = uri.split("?", 1)
    params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
    scheme = params.get("scheme", "https")
    opts = {}
    if "endpoint_override" in params:
        endpoint = params["endpoint_override"]
        opts["aws_endpoint"] = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
    if scheme == "http":
        opts["allow_http"] = "true"
    if "region" in params:
        opts["aws_region"] = params["region"]
    return base, opts or None


def remove_tree(uri: str) -> None:
    """Remove a folder and everything under it (nothing when it does not exist)."""
    loc = resolve(uri)
    if loc.fs.get_file_info(loc.path).type == pafs.FileType.NotFound:
        return
    loc.fs.delete_dir(loc.path)

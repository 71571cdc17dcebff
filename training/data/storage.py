"""Local paths and s3://bucket/key URIs behind one small API.

Why: datasets and translated sets live on a laptop's disk in development and in object storage on a cluster; the
readers above this module should not care which. Everything is bytes in, bytes out.

S3 goes through boto3 with its usual configuration chain (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
AWS_DEFAULT_REGION, ...). For S3-compatible stores (MinIO, Ceph, moto in the tests) set AWS_ENDPOINT_URL (or the
S3-only AWS_ENDPOINT_URL_S3): boto3 honours both, so no endpoint is ever hard-coded here. S3 has no directories:
`list_files` and `exists` treat a URI as a directory when objects exist under "<key>/".
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

S3_SCHEME = "s3://"

# Environment variables that change which S3 endpoint or identity boto3 uses; a client is cached per combination.
_CLIENT_ENVIRONMENT = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
_MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for s3://bucket/key URIs, False for local paths."""
    return str(uri).startswith(S3_SCHEME)


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Append path parts to a local path or an S3 URI, with '/' separators either way."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(part.strip("/") for part in parts)])
    return str(Path(base).joinpath(*parts))


def relative_to(uri: str, base: str | os.PathLike[str]) -> str:
    """The part of `uri` below `base`, '/'-separated (for matching files across local and S3 trees)."""
    if is_s3(base):
        prefix = str(base).rstrip("/") + "/"
        if not uri.startswith(prefix):
            raise ValueError(f"{uri} is not under {base}")
        return uri[len(prefix) :]
    return Path(uri).relative_to(Path(base)).as_posix()


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    """The whole content of a file or object; FileNotFoundError naming the URI when there is none."""
    uri = str(uri)
    if not is_s3(uri):
        try:
            return Path(uri).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
            raise FileNotFoundError(f"no file at {uri}") from error
    bucket, key = _split(uri)
    try:
        return _client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as error:
        if _is_missing(error):
            raise FileNotFoundError(f"no object at {uri}") from error
        raise


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    """Create or replace a file or object; local parent directories are created as needed."""
    uri = str(uri)
    if not is_s3(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    bucket, key = _split(uri)
    try:
        _client().put_object(Bucket=bucket, Key=key, Body=data)
    except Exception as error:
        if _is_missing(error):
            raise FileNotFoundError(f"cannot write {uri}: bucket {bucket!r} does not exist") from error
        raise


def list_files(uri: str | os.PathLike[str], suffixes: tuple[str, ...] = ()) -> list[str]:
    """All files below a directory or prefix, recursively, sorted, as URIs of the same kind as `uri`.

    suffixes: keep only names ending in one of these (case-insensitive), e.g. (".png", ".jpg"); empty keeps all.
    A missing local directory or S3 bucket raises FileNotFoundError; an empty S3 prefix gives [].
    """
    uri = str(uri)
    wanted = tuple(suffix.lower() for suffix in suffixes)

    def keep(name: str) -> bool:
        return not wanted or name.lower().endswith(wanted)

    if not is_s3(uri):
        root = Path(uri)
        if not root.is_dir():
            raise FileNotFoundError(f"no directory at {uri}")
        return sorted(str(path) for path in root.rglob("*") if path.is_file() and keep(path.name))
    bucket, key = _split(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    found = []
    try:
        for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found.extend(
                f"{S3_SCHEME}{bucket}/{item['Key']}"
                for item in page.get("Contents", [])
                if not item["Key"].endswith("/") and keep(item["Key"])
            )
    except Exception as error:
        if _is_missing(error):
            raise FileNotFoundError(f"no bucket for {uri}") from error
        raise
    return sorted(found)


def exists(uri: str | os.PathLike[str]) -> bool:
    """Whether a file, directory, object or non-empty prefix is at `uri`."""
    uri = str(uri)
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = _split(uri)
    client = _client()
    try:
        if key:
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except Exception as error:
                if not _is_missing(error):
                    raise
        listing = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/" if key else "", MaxKeys=1)
        return bool(listing.get("KeyCount", 0))
    except Exception as error:
        if _is_missing(error):
            return False
        raise


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI without a bucket: {uri!r} (expected s3://bucket/key)")
    return bucket, key


def _is_missing(error: Exception) -> bool:
    response: Any = getattr(error, "response", None)
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    return code in _MISSING_CODES


def _client() -> Any:
    return _client_for(tuple(os.environ.get(name) for name in _CLIENT_ENVIRONMENT))


@lru_cache(maxsize=8)
def _client_for(environment: tuple[str | None, ...]) -> Any:
    """One boto3 client per endpoint/credential setting: creating clients is slow, and tests switch settings."""
    import boto3  # deferred: local-only users never pay for importing boto3

    del environment  # only the cache key; boto3 reads the same variables itself
    return boto3.session.Session().client("s3")

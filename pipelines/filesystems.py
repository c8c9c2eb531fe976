"""Local paths and object-storage URIs behind one interface: pyarrow filesystems.

Every job reads its inputs and writes its run directory through :func:`resolve_filesystem`, so
``/data/x``, ``file:///data/x``, ``s3://bucket/x`` and ``gs://bucket/x`` work the same way.
Credentials and endpoints come from the environment, as pyarrow reads them (``AWS_*`` variables
or an instance role for S3, application default credentials for GCS).
"""

from __future__ import annotations

import os
import posixpath
import time

import pyarrow as pa
import pyarrow.fs as pafs

#: Environment variable naming where runs go when a command is not given an output directory
#: (``moco submit --storage`` sets it for a job), e.g. ``s3://bucket/moco-runs``.
STORAGE_ENV = "MOCO_STORAGE"


class StorageError(ValueError):
    """A path or URI that cannot be opened; the message names it."""


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI pyarrow understands (s3://, gs://, file://)."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise StorageError(f"cannot open {uri}: {error}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def default_output_dir(name: str) -> str:
    """``$MOCO_STORAGE/<name>-<time>`` (e.g. a bucket every node reads), else ``outputs/<name>-<time>``."""
    return join(os.environ.get(STORAGE_ENV) or "outputs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def output_directory(output: str) -> str:
    """A command's output directory as :func:`absolute_uri` gives it.

    Raises:
        StorageError: ``output`` is a local file.
    """
    output = absolute_uri(output)
    if "://" not in output and os.path.exists(output) and not os.path.isdir(output):
        raise StorageError(f"--output {output} is a file; give a directory")
    return output


def absolute_uri(uri: str) -> str:
    """``uri`` with a local path made absolute (``~`` expanded), so it means the same from any
    working directory; a URI (``s3://...``) as it is."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def join(uri: str, relative: str) -> str:
    """``uri/relative`` for a local path or a URI."""
    return posixpath.join(uri.rstrip("/"), relative) if "://" in uri else os.path.join(uri, relative)


def uri_for(original: str, path: str) -> str:
    """A URI for filesystem ``path`` in the style of ``original`` (a local path stays a path)."""
    if "://" not in original:
        return path
    return f"{original.split('://', 1)[0]}://{path}"

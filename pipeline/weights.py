"""Model weights: finding them (a local path, the cache, or a verified download) and their checksums.

Weights are downloaded once into the cache (`$RCMA_CACHE`, default ~/.cache/rcma), checked
against a SHA-256, and renamed into place only when the checksum matches. Offline, a missing
file fails with one line saying which file and how to provide it.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import urllib.request
from pathlib import Path

from pipeline.errors import ModelUnavailable
from pipeline.files import atomic_file, cache_dir, sha256_file

DOWNLOAD_TIMEOUT_S = 30


_checksums: dict[tuple[str, int, int], str] = {}


def weights_checksum(path: str | Path) -> str:
    """sha256 of a weights file or of a model folder's files, computed once per (path, size,
    modification time): a config that names user-given weights records this, so weights swapped
    behind the same path or environment variable are a changed config."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _checksums:
            _checksums[key] = sha256_file(file)
        digest.update(f"{file.relative_to(path) if path.is_dir() else ''}:{_checksums[key]}".encode())
    return digest.hexdigest()


def fetch_weights(
    name: str, url: str, sha256: str | None, *, env_var: str, option: str, local: str | Path | None = None
) -> Path:
    """Path of verified weights for `name`: `local`, else `$env_var`, else the cache, else a download.

    `sha256` may be None where the publisher gives no checksum; then a download is kept as is and
    its checksum is recorded by the caller as provenance.
    """
    given = local or os.environ.get(env_var)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise ModelUnavailable(
                f"{name}: weights file {path} (from {option} or ${env_var}) does not exist"
            )
        return path
    target = cache_dir() / name / url.rsplit("/", 1)[-1]
    if target.is_file() and (sha256 is None or sha256_file(target) == sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp:  # a killed download leaves no file under the weights' name
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
                while block := response.read(1 << 20):
                    out.write(block)
        except OSError as e:
            raise ModelUnavailable(
                f"{name}: weights {target.name} are not in {target.parent} and could not be downloaded "
                f"from {url} ({getattr(e, 'reason', e)}); download it and pass {option} PATH or "
                f"set ${env_var}"
            ) from None
        if sha256 is not None and (actual := sha256_file(tmp)) != sha256:
            raise ModelUnavailable(
                f"{name}: downloaded {target.name} has SHA-256 {actual}, expected {sha256}"
            )
    return target


def packaged_model(module: str, marker: str) -> Path | None:
    """A model folder shipped inside an installed package (`module.get_model_path()`), if present."""
    try:
        package = importlib.import_module(module)
    except ImportError:
        return None
    path = Path(package.get_model_path())
    return path if (path / marker).is_file() else None

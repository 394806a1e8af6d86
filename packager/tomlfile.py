"""Reading the small TOML files a user writes for edgepack (``card.toml``, a retraining
recipe): bounded, UTF-8, one message per way a file fails.

This module checks no key: the card (:mod:`packager.card`) and the recipe
(:mod:`packager.retrain`) name their own keys and values.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from packager.errors import PackagerError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["read_toml"]


def read_toml(path: Path, max_bytes: int, error: type[PackagerError], what: str
              ) -> tuple[dict[str, Any], bytes]:
    """The TOML document at ``path`` and its bytes (a recipe records their digest), read
    whole: it is at most ``max_bytes``.

    Raises:
        PackagerError: as ``error`` (the caller's own class), naming ``path``: the file
            cannot be read, is larger than ``max_bytes``, or is not UTF-8 TOML.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror})") from exc
    if len(raw) > max_bytes:
        raise error(f"{path}: {len(raw)} bytes; a {what} is at most {max_bytes}")
    try:
        return tomllib.loads(raw.decode("utf-8")), raw
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise error(f"{path}: not a TOML file ({exc})") from exc

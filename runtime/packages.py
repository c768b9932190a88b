"""Finding the folder of an installed data package (weights, benchmarks, the embedding model).

Found with `find_spec`, never imported: the packages that ship Consort's data pull in
their own machinery on import (the `llm` CLI, an evaluation harness), and only their
files are needed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_folder(package: str) -> Path | None:
    """The installed package's folder, or None when it is not installed (the caller says what to install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))

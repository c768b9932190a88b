"""bench.member_pairs: members' accuracy on the questions all of them answered, read from the records layout."""

from __future__ import annotations

import json
from pathlib import Path

from bench.member_pairs import load, members_table


def _write(folder: Path, rows: list[dict[str, object]]) -> None:
    folder.mkdir(parents=True)
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_counts_only_shared_questions_and_the_folders_member(tmp_path: Path) -> None:
    _write(
        tmp_path / "a" / "mc",
        [{"task": "sciq", "id": str(i), "members": {"a": {"correct": i < 3}}} for i in range(4)],
    )
    # b's folder is a pair's run: it also holds a's answers, which must not replace a's own.
    _write(
        tmp_path / "b" / "mc",
        [
            {"task": "sciq", "id": str(i), "members": {"a": {"correct": False}, "b": {"correct": i == 0}}}
            for i in range(2)
        ],
    )
    table = load(tmp_path, "mc")
    assert table["sciq"]["0"] == {"a": True, "b": True}
    assert members_table(table).splitlines()[2] == "| sciq | 2 | 100.0 | 50.0 |"

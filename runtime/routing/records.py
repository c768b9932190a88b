"""Who got which question right: `consort eval` prediction records, read for the routers and the benchmark.

Records live at <root>/<member>/<group>/predictions.jsonl (one JSON object a question: `task`, `id`,
`question`, and per member `members.<name>.correct`). Several files may hold the same question for
different members; they are merged. The dev/test split is a hash of (task, id): stable across runs and
machines, and the same for every member, so routers are fitted on dev ids and measured on test ids only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from consort.runtime.errors import InvalidRequest


@dataclass
class QuestionRecord:
    """One question and which members answered it correctly."""

    task: str
    id: str
    question: str
    correct: dict[str, bool] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.id}"


@dataclass(frozen=True)
class Split:
    """Dev/test by a hash of the question's key: a share `test_share` of questions is test."""

    test_share: float = 0.5
    salt: str = "consort-route"

    def is_test(self, key: str) -> bool:
        digest = hashlib.sha256(f"{self.salt}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.test_share

    def dev(self, records: Iterable[QuestionRecord]) -> list[QuestionRecord]:
        return [r for r in records if not self.is_test(r.key)]

    def test(self, records: Iterable[QuestionRecord]) -> list[QuestionRecord]:
        return [r for r in records if self.is_test(r.key)]


@dataclass(frozen=True)
class MemberAnswer:
    """One member's answer to one question, as its prediction record holds it."""

    task: str
    id: str
    question: str
    member: str
    answer: Mapping[str, object]


def iter_answers(
    paths: Iterable[Path], *, owner_of: Callable[[Path], str] | None = None
) -> Iterator[MemberAnswer]:
    """Every member's answer in the prediction files, in file order.

    With `owner_of`, a file yields only the answers of the member it names for that file's path,
    and a file whose rows hold no answer of that member is an error (a misnamed folder must not
    quietly drop out of a table).
    """
    for path in paths:
        owner = owner_of(path) if owner_of is not None else None
        rows = seen_owner = False
        with path.open() as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    task, qid, members = row["task"], str(row["id"]), row["members"]
                    items = list(members.items())
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                    raise InvalidRequest(f"{path}:{line_no} is not a prediction record ({error})") from error
                rows = True
                for member, answer in items:
                    if owner is not None and member != owner:
                        continue
                    seen_owner = True
                    if isinstance(answer, Mapping):
                        yield MemberAnswer(task, qid, row.get("question") or "", member, answer)
        # An empty file is a run that has not answered yet; rows without the owner are a misnamed folder.
        if owner is not None and rows and not seen_owner:
            raise InvalidRequest(
                f"{path} is in the folder of member {owner!r} but holds no answer of {owner!r}; "
                "name the folder after the member whose records it holds"
            )


def read_predictions(
    paths: Iterable[Path], *, owner_of: Callable[[Path], str] | None = None
) -> dict[str, QuestionRecord]:
    """Merge prediction files into one record per question (a question's members come from every file).

    With `owner_of`, as `iter_answers`: each file gives only the member its path names.
    """
    out: dict[str, QuestionRecord] = {}
    for found in iter_answers(paths, owner_of=owner_of):
        record = out.setdefault(
            f"{found.task}/{found.id}", QuestionRecord(found.task, found.id, found.question)
        )
        if found.answer.get("correct") is not None:
            record.correct[found.member] = bool(found.answer["correct"])
    return out


def find_predictions(root: Path, group: str | None = None) -> list[Path]:
    """Every <root>/<member>/<group>/predictions.jsonl (of one group, or all)."""
    pattern = f"*/{group}/predictions.jsonl" if group else "*/*/predictions.jsonl"
    return sorted(root.glob(pattern))


def member_folder(path: Path) -> str:
    """The member a <root>/<member>/<group>/predictions.jsonl belongs to."""
    return path.parent.parent.name


def read_records(root: Path, group: str | None = None) -> dict[str, QuestionRecord]:
    """The layout's records, each file contributing only the member its folder names.

    A member's folder may link to an ensemble's run holding several members (a pair's `consort
    eval` also answers each member alone): only the named member is read from it, so linking a
    pair's run in never overwrites another member's own run of the same questions.
    """
    return read_predictions(find_predictions(root, group), owner_of=member_folder)


def complete_for(records: Mapping[str, QuestionRecord], members: Iterable[str]) -> list[QuestionRecord]:
    """The questions every one of `members` has an answer for, in a stable order."""
    wanted = list(members)
    return [r for _, r in sorted(records.items()) if all(m in r.correct for m in wanted)]

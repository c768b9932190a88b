"""The routers' durable state: every routing decision and every piece of feedback, in one SQLite file.

Why SQLite and not a Ray actor: the state is an append-only log (decisions, feedback) that
each router folds into its parameters, so what must be shared is the log, not a live
object. A file on a volume is shared by every replica on the node (and by the CLI and the
benchmarks, which have no Ray), survives any process dying, and needs no extra actor to
place, restart or make durable. WAL mode lets readers run beside one writer; a busy
timeout makes concurrent writers (several replicas taking feedback at once) queue instead
of failing; each write is one short transaction. Replicas on several nodes need the file
on a shared volume that honours POSIX locks, or one node's file behind a single writer:
docs/architecture.md says so.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from consort.runtime.errors import ConfigError, InvalidRequest, RoutingDecisionNotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    router TEXT NOT NULL,
    members TEXT NOT NULL,            -- JSON list: the member(s) that answered
    embedding BLOB,                   -- float32 query embedding (None for routers that need none)
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_request ON decisions(request_id);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    winner TEXT,                      -- preference: the better member
    loser TEXT,                       -- preference: the worse member
    tie INTEGER NOT NULL DEFAULT 0,   -- preference: neither was better
    member TEXT,                      -- score: the member scored
    score REAL,                       -- score in [0, 1]
    embedding BLOB,                   -- the request's query embedding (copied from its decision)
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Decision:
    """One routed request, as stored."""

    request_id: str
    router: str
    members: list[str]
    embedding: np.ndarray | None


@dataclass(frozen=True)
class FeedbackEvent:
    """One piece of feedback, in the order the store took it (`id` increases)."""

    id: int
    request_id: str
    embedding: np.ndarray | None
    winner: str | None = None
    loser: str | None = None
    tie: bool = False
    member: str | None = None
    score: float | None = None

    @property
    def is_preference(self) -> bool:
        return self.winner is not None


def _blob(vector: np.ndarray | None) -> bytes | None:
    return None if vector is None else np.asarray(vector, dtype=np.float32).tobytes()


def _vector(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32).copy()


class RoutingStore:
    """Decisions and feedback in a SQLite file; safe for several processes and threads at once."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ConfigError(
                f"route.store: the folder {self.path.parent} does not exist; create it or fix the path"
            )
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 connections are not shared across threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def journal_mode(self) -> str:
        return str(self._connect().execute("PRAGMA journal_mode").fetchone()[0])

    # -- decisions -----------------------------------------------------------------------------
    def record_decision(
        self, request_id: str, router: str, members: Sequence[str], embedding: np.ndarray | None
    ) -> None:
        db = self._connect()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO decisions (request_id, router, members, embedding, created) VALUES (?, ?, ?, ?, ?)",
                (request_id, router, json.dumps(list(members)), _blob(embedding), time.time()),
            )

    def decision(self, request_id: str) -> Decision:
        """The request's first routing decision; RoutingDecisionNotFound when none was stored."""
        row = (
            self._connect()
            .execute(
                "SELECT request_id, router, members, embedding FROM decisions WHERE request_id = ? ORDER BY id LIMIT 1",
                (request_id,),
            )
            .fetchone()
        )
        if row is None:
            raise RoutingDecisionNotFound(
                f"no routed request has the id {request_id!r}; give the id of a response of the `route` strategy"
            )
        return Decision(
            request_id=row[0], router=row[1], members=json.loads(row[2]), embedding=_vector(row[3])
        )

    def decision_count(self) -> int:
        return int(self._connect().execute("SELECT COUNT(*) FROM decisions").fetchone()[0])

    # -- feedback ------------------------------------------------------------------------------
    def add_preference(self, request_id: str, winner: str, loser: str, *, tie: bool = False) -> int:
        if winner == loser:
            raise InvalidRequest("a preference compares two different members; winner and loser are the same")
        return self._add_feedback(request_id, winner=winner, loser=loser, tie=tie)

    def add_score(self, request_id: str, member: str, score: float) -> int:
        if not 0.0 <= score <= 1.0:
            raise InvalidRequest(f"a score must lie in [0, 1], got {score}")
        return self._add_feedback(request_id, member=member, score=score)

    def _add_feedback(
        self,
        request_id: str,
        *,
        winner: str | None = None,
        loser: str | None = None,
        tie: bool = False,
        member: str | None = None,
        score: float | None = None,
    ) -> int:
        decision = self.decision(request_id)  # raises before anything is written
        db = self._connect()
        with db:
            db.execute("BEGIN IMMEDIATE")
            cursor = db.execute(
                "INSERT INTO feedback (request_id, winner, loser, tie, member, score, embedding, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, winner, loser, int(tie), member, score, _blob(decision.embedding), time.time()),
            )
        assert cursor.lastrowid is not None
        return int(cursor.lastrowid)

    def feedback_since(self, after_id: int = 0) -> list[FeedbackEvent]:
        """Feedback taken after the event `after_id`, oldest first (routers fold it in incrementally)."""
        rows = (
            self._connect()
            .execute(
                "SELECT id, request_id, embedding, winner, loser, tie, member, score FROM feedback "
                "WHERE id > ? ORDER BY id",
                (after_id,),
            )
            .fetchall()
        )
        return [
            FeedbackEvent(
                id=r[0],
                request_id=r[1],
                embedding=_vector(r[2]),
                winner=r[3],
                loser=r[4],
                tie=bool(r[5]),
                member=r[6],
                score=r[7],
            )
            for r in rows
        ]

    def feedback_count(self) -> int:
        return int(self._connect().execute("SELECT COUNT(*) FROM feedback").fetchone()[0])

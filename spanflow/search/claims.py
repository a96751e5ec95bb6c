"""Which worker trains which grid point: an atomic claim in the study's own database.

Optuna's GridSampler can hand one point to two workers that ask at the same moment, and on SQLite
even popping an enqueued trial is a read-then-write race. A claim is a row keyed by
(study, point, attempt): the database accepts exactly one insert per key, on SQLite and
PostgreSQL alike, so exactly one worker wins each attempt at each point.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, create_engine, delete, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

_METADATA = MetaData()
CLAIMS = Table(
    "spanflow_grid_claims",
    _METADATA,
    Column("study_name", String(512), primary_key=True),
    Column("point", String(128), primary_key=True),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("worker", String(256), nullable=False),
    Column("trial_number", Integer, nullable=True),
    Column("claimed_at", DateTime, nullable=False),
)


def utc_now() -> datetime:
    """Naive UTC: what SQLite and PostgreSQL `timestamp` columns store alike, whatever the host's zone."""
    return datetime.now(UTC).replace(tzinfo=None)


def make_engine(url: str) -> Engine:
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return create_engine(url, **kwargs)


class ClaimBoard:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        try:
            _METADATA.create_all(self.engine)
        except (OperationalError, ProgrammingError):  # another process created it at the same moment
            _METADATA.create_all(self.engine)

    def claim(self, study: str, point: str, attempt: int, worker: str) -> bool:
        """True for the one worker whose insert of (study, point, attempt) went through."""
        row = {"study_name": study, "point": point, "attempt": attempt, "worker": worker, "claimed_at": utc_now()}
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(CLAIMS).values(**row))
        except IntegrityError:
            return False
        return True

    def set_trial(self, study: str, point: str, attempt: int, trial_number: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(CLAIMS)
                .where(CLAIMS.c.study_name == study, CLAIMS.c.point == point, CLAIMS.c.attempt == attempt)
                .values(trial_number=trial_number)
            )

    def release_unstarted(self, study: str, worker: str) -> int:
        """Drop the claims of a dead worker that never got as far as creating their trial."""
        with self.engine.begin() as conn:
            done = conn.execute(
                delete(CLAIMS).where(
                    CLAIMS.c.study_name == study, CLAIMS.c.worker == worker, CLAIMS.c.trial_number.is_(None)
                )
            )
            return done.rowcount

    def claims(self, study: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(CLAIMS).where(CLAIMS.c.study_name == study).order_by(CLAIMS.c.claimed_at))
            return [dict(r._mapping) for r in rows]

    def dispose(self) -> None:
        self.engine.dispose()

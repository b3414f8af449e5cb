"""The job store: one SQLite file in the workspace (`<workspace>/jobs.db`, WAL mode), and a
`job.json` beside each job's files in `<workspace>/jobs/<id>/`.

The database is the index the queue reads; each job's `job.json` is its own copy of the same
record, rewritten on every change of status. So a database that is lost, corrupted or
replaced by another program's file is rebuilt from the job folders, never silently emptied:
the bad file is moved aside (`jobs.db.corrupt-<time>`) and the store says so in `notice`.

Every call opens its own connection: the page's handlers, the queue's runner threads and the
training threads all use the store at once, and sqlite3 connections are not shared across
threads. `BEGIN IMMEDIATE` makes each read-modify-write (a new id, a queue position) atomic,
so two submissions at the same instant get two ids and two places in the queue.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from trainer.io import atomic_write_text

log = logging.getLogger(__name__)

DB_NAME = "jobs.db"
JOBS_FOLDER = "jobs"
RECORD_NAME = "job.json"
# PRAGMA application_id: tells our file from any other SQLite database ("ATLJ").
APPLICATION_ID = 0x41544C4A
SCHEMA_VERSION = 2
# Columns added since version 1, and their types: an older database gains them in place.
ADDED_COLUMNS = {"best_validation_loss": "REAL", "best_validation_step": "INTEGER"}

QUEUED, RUNNING, FINISHED, STOPPED, FAILED, INTERRUPTED = (
    "queued", "running", "finished", "stopped", "failed", "interrupted")
STATUSES = (QUEUED, RUNNING, FINISHED, STOPPED, FAILED, INTERRUPTED)
ENDED = (FINISHED, STOPPED, FAILED)
# Jobs the server still owes a run: a running job when the server died is one of these.
PENDING = (QUEUED, INTERRUPTED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    position INTEGER NOT NULL DEFAULT 0,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    loss REAL,
    smooth_loss REAL,
    best_validation_loss REAL,
    best_validation_step INTEGER,
    backup_step INTEGER,
    output_path TEXT,
    outputs TEXT NOT NULL DEFAULT '[]',
    message TEXT NOT NULL DEFAULT '',
    error TEXT,
    note TEXT NOT NULL DEFAULT ''
);
"""


class StoreError(Exception):
    """The database file cannot be used (not ours, corrupted)."""


@dataclass
class Job:
    id: int
    owner: str
    status: str
    position: int
    config: dict                 # as submitted (before the job folder replaced workspace_dir)
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    smooth_loss: float | None = None
    best_validation_loss: float | None = None  # the lowest validation loss, and its step
    best_validation_step: int | None = None
    backup_step: int | None = None
    output_path: str | None = None
    outputs: list[str] = field(default_factory=list)
    message: str = ""
    error: str | None = None
    note: str = ""               # what a restart did: continued from a backup, or from step 0

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.time()) - self.started_at

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        data = dict(row)
        data["config"] = json.loads(data["config"])
        data["outputs"] = json.loads(data["outputs"] or "[]")
        return cls(**data)

    @classmethod
    def from_record(cls, data: dict) -> "Job":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


COLUMNS = [f.name for f in fields(Job)]


class JobStore:
    def __init__(self, workspace: Path | str):
        self.workspace = Path(workspace)
        self.path = self.workspace / DB_NAME
        self.jobs_root = self.workspace / JOBS_FOLDER
        self.notice = ""  # what opening found wrong and did about it, for the panel and log
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.jobs_root.mkdir(exist_ok=True)
        self._open()

    # -- opening, checking, rebuilding ---------------------------------------------------------

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            if write:
                conn.execute("BEGIN IMMEDIATE")  # one writer at a time: atomic ids, positions
            yield conn
            if write:
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def _check(self) -> None:
        """Raise StoreError when the file is not a sound Atelier job database."""
        try:
            with self._connect() as conn:
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                tables = {r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'")}
                if app_id != APPLICATION_ID:
                    raise StoreError(f"it is not an Atelier job database (application_id "
                                     f"{app_id:#x}, tables: {', '.join(sorted(tables)) or 'none'})")
                result = conn.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise StoreError(f"the integrity check failed: {result}")
                if "jobs" not in tables:
                    raise StoreError("it has no jobs table")
                columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
                for name, kind in ADDED_COLUMNS.items():  # an older version's database
                    if name not in columns:
                        conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
                        columns.add(name)
                missing = set(COLUMNS) - columns
                if missing:
                    raise StoreError(f"its jobs table lacks {', '.join(sorted(missing))}")
        except sqlite3.DatabaseError as error:
            raise StoreError(str(error)) from None

    def _create(self) -> None:
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the runner's writes
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.executescript(SCHEMA)

    def _open(self) -> None:
        existed = self.path.exists() and self.path.stat().st_size > 0
        if existed:
            try:
                self._check()
            except StoreError as reason:
                aside = self._aside_name()
                for suffix in ("", "-wal", "-shm"):
                    part = Path(str(self.path) + suffix)
                    if part.exists():
                        part.rename(str(aside) + suffix)
                self._create()
                count = self._rebuild()
                self.notice = (f"The job database {self.path} could not be used ({reason}). It "
                               f"was moved aside to {aside.name}, and {count} job(s) were "
                               f"rebuilt from the folders in {self.jobs_root}.")
                log.warning(self.notice)
                return
        else:
            self._create()
            # A database deleted by hand: the job folders still say what ran.
            count = self._rebuild()
            if count:
                self.notice = (f"No job database was found; {count} job(s) were rebuilt from "
                               f"the folders in {self.jobs_root}.")
                log.warning(self.notice)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")

    def _aside_name(self) -> Path:
        """A name no earlier moved-aside file has (two in one second must not collide)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = self.path.with_name(f"{DB_NAME}.corrupt-{stamp}"), 1
        while any(Path(str(aside) + s).exists() for s in ("", "-wal", "-shm")):
            n += 1
            aside = self.path.with_name(f"{DB_NAME}.corrupt-{stamp}-{n}")
        return aside

    def _rebuild(self) -> int:
        """Insert every job whose folder holds a readable job.json; returns how many."""
        records = []
        for folder in self.jobs_root.iterdir():
            record = folder / RECORD_NAME
            if not (folder.is_dir() and folder.name.isdigit() and record.is_file()):
                continue
            try:
                job = Job.from_record(json.loads(record.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as error:
                log.warning("Job folder %s: its %s is unreadable (%s); left out.", folder,
                            RECORD_NAME, error)
                continue
            records.append(job)
        with self._connect(write=True) as conn:
            for job in sorted(records, key=lambda j: j.id):
                conn.execute(f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES "
                             f"({', '.join('?' * len(COLUMNS))})", self._values(job))
        return len(records)

    # -- records --------------------------------------------------------------------------------

    @staticmethod
    def _values(job: Job) -> list:
        data = job.as_dict()
        data["config"] = json.dumps(job.config)
        data["outputs"] = json.dumps(job.outputs)
        return [data[c] for c in COLUMNS]

    def folder(self, job_id: int) -> Path:
        return self.jobs_root / str(job_id)

    def _write_record(self, job: Job) -> None:
        atomic_write_text(self.folder(job.id) / RECORD_NAME, json.dumps(job.as_dict(), indent=2))

    def add(self, owner: str, config: dict) -> Job:
        """A new queued job at the end of the queue, with its folder."""
        with self._connect(write=True) as conn:
            position = conn.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM jobs").fetchone()[0]
            cursor = conn.execute(
                "INSERT INTO jobs (owner, status, position, config, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (owner, QUEUED, position, json.dumps(config), time.time()))
            job = Job.from_row(conn.execute("SELECT * FROM jobs WHERE id = ?",
                                            (cursor.lastrowid,)).fetchone())
        self.folder(job.id).mkdir(parents=True, exist_ok=True)
        self._write_record(job)
        return job

    def get(self, job_id: int) -> Job | None:
        """The job, or None; an id outside SQLite's 64-bit integers is no job (not an
        OverflowError)."""
        if not isinstance(job_id, int) or not -2 ** 63 <= job_id < 2 ** 63:
            return None
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def all(self) -> list[Job]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        return [Job.from_row(r) for r in rows]

    def pending(self) -> list[Job]:
        """Jobs owed a run, in the order they run: interrupted ones (they were running when
        the server stopped) first, then the queue by position."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY status = ?, "
                "COALESCE(started_at, 0), position, id", (INTERRUPTED, QUEUED, QUEUED)).fetchall()
        return [Job.from_row(r) for r in rows]

    def update(self, job_id: int, record: bool = True, **values: Any) -> Job | None:
        """Set columns of a job; with `record`, its job.json follows (status changes)."""
        if "outputs" in values:
            values["outputs"] = json.dumps(values["outputs"])
        if "config" in values:
            values["config"] = json.dumps(values["config"])
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self._connect(write=True) as conn:
            conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values.values(), job_id])
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        job = Job.from_row(row) if row else None
        if job is not None and record:
            try:
                self._write_record(job)
            except OSError as error:  # a full disk: the database still has it
                log.warning("Could not write %s of job %s: %s", RECORD_NAME, job_id, error)
        return job

    def swap_positions(self, first: int, second: int) -> None:
        with self._connect(write=True) as conn:
            a = conn.execute("SELECT position FROM jobs WHERE id = ?", (first,)).fetchone()[0]
            b = conn.execute("SELECT position FROM jobs WHERE id = ?", (second,)).fetchone()[0]
            conn.execute("UPDATE jobs SET position = ? WHERE id = ?", (b, first))
            conn.execute("UPDATE jobs SET position = ? WHERE id = ?", (a, second))
        for job_id in (first, second):
            job = self.get(job_id)
            if job is not None:
                self._write_record(job)

    def delete(self, job_id: int) -> None:
        with self._connect(write=True) as conn:
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

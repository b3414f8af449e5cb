"""The job queue: jobs kept in the store (trainer/jobs/store.py), run one after another (or
`concurrency` at a time, by default one per GPU) by TrainingSession, each in its own folder
`<workspace>/jobs/<id>/` and its own process (trainer/jobs/child.py), pinned to its GPU.

It also stands where the single in-memory session stood for the page: `state()`, `stop()`,
`request()`, `job_config()` and `running` act on the job a viewer follows (the newest of
their running jobs), so the footer and its buttons work as before.

Owners: every job records who submitted it. A `Viewer` without a login (`name` "") is the one
owner of a local server and sees everything; with a login, a viewer sees, stops and deletes
only their own jobs, unless the server named them admin.

A shared server (issue 23): the queue holds the server's `Realm` and checks every path a
config names with `Access(realm, viewer)` (trainer/security.py) at submit, and again when the
job starts (a dataset may have changed hands while it waited). A non-admin's output is written
into their own job folder, `<job folder>/output/<name>`, whatever path they gave; the job's
record keeps what was submitted. `limits` (trainer/limits.py) bound what one visitor may ask:
total steps per job, running + queued jobs per user (admins are not limited).
"""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Callable

from trainer.config import (LearningRateScheduler, TimeUnit, TrainConfig, check_supported,
                            config_from_dict)
from trainer.control import Event
from trainer.data.cache import DATA_CACHE_ENV
from trainer.errors import AtelierError, ConfigError
from trainer.jobs import resume
from trainer.jobs.child import TrainInChild, child_environment, cuda_device_count
from trainer.jobs.lock import FolderLock
from trainer.limits import LIMIT_OPTIONS, ServerLimits, estimate_steps
from trainer.ownership import LOCAL, Access, Realm, Viewer
from trainer.jobs.store import (ENDED, FAILED, FINISHED, INTERRUPTED, PENDING, QUEUED, RUNNING,
                                STOPPED, Job, JobStore)
from trainer.demo import DEMO_DATASET_DIR
from trainer.security import as_opened, check_config_access
from trainer.session import JobState, TrainingSession

log = logging.getLogger(__name__)

PROGRESS_WRITE_SECONDS = 1.0  # a running job's step and loss reach the database this often
KEEP_ENDED_SESSIONS = 8       # ended jobs whose live state (plots, samples) stays in memory
# On a Hugging Face Space the machine restarts often: a backup every few minutes, so a
# restart loses at most that (the config's own default is 30 minutes).
SPACE_BACKUP_MINUTES = 5




def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def space_defaults(data: dict) -> dict:
    """A submitted config dict with the Space's backup interval, unless it names its own."""
    if on_space() and "backup_after" not in data and "backup_after_unit" not in data:
        return {**data, "backup_after": SPACE_BACKUP_MINUTES,
                "backup_after_unit": TimeUnit.MINUTE.value}
    return data


def default_concurrency() -> int:
    """One job per GPU, each in its own process pinned to its GPU; one on a CPU (two jobs
    there would share the same cores, each at half speed)."""
    return cuda_device_count() or 1


def job_number(job_id) -> int | None:
    """`job_id` as a job number (an int, or the digits of one), or None when no job can have
    it: SQLite's integers are 64-bit, so a larger number is no job, not an OverflowError."""
    if isinstance(job_id, bool):
        return None
    if isinstance(job_id, str):
        text = job_id.strip()
        if not text.isascii() or not text.isdigit() or len(text) > 19:
            return None
        job_id = int(text)
    if not isinstance(job_id, int) or not 0 < job_id < 2 ** 63:
        return None
    return job_id


def shown_id(job_id) -> str:
    """A job id as a refusal quotes it: cut short (an int of 5,000 digits cannot even be
    printed by default)."""
    try:
        text = str(job_id)
    except ValueError:
        return "(a number too long to show)"
    return text if len(text) <= 40 else text[:40] + "…"


def confined_output(config: TrainConfig, folder: Path) -> Path:
    """Where a non-admin's output goes on a shared server: `<job folder>/output/<name>`, the
    name being the last part of what they gave (made a safe file name), else the default."""
    from trainer.data.safe_names import UnsafeName, safe_component
    given = config.output_model_destination.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    try:
        name = safe_component(given.replace("\x00", ""))
    except UnsafeName:
        name = ""
    if not name:
        name = {"FINE_TUNE": "model", "EMBEDDING": "embedding"}.get(
            config.training_method.value, "lora")
    return Path(folder) / "output" / name


class JobQueue:
    def __init__(self, allow_custom_code: bool = False,
                 default_workspace: Callable[[], Path] | None = None,
                 train_fn: Callable | None = None,
                 default_realm: Callable[[], Realm] | None = None) -> None:
        """`train_fn` stands in for the training loop, run in a thread of this process (the
        queue's tests); without it, each job trains in a child process of its own.
        `default_workspace` / `default_realm`: where and how the store opens on first use
        when `open` was not called."""
        self.allow_custom_code = allow_custom_code
        self.confine_root: Path | None = None
        # How the server was started (set by `open`): a local realm checks nothing.
        self.realm: Realm | None = None
        # What one visitor may ask (ui/state.py sets the server's; none by default).
        self.limits = ServerLimits()
        # Login names the server made admins (ui/state.py): a job of theirs keeps its chosen
        # output path when it starts again after a restart.
        self.admins: frozenset[str] = frozenset()
        self._admin_jobs: set[int] = set()   # jobs an admin submitted while this server ran
        self.concurrency = 1
        self.store: JobStore | None = None
        self._default_workspace = default_workspace
        self._default_realm = default_realm
        self._train_fn = train_fn
        self._lock = threading.RLock()
        self._sessions: dict[int, TrainingSession] = {}   # running and recently ended
        self._slots: dict[int, int] = {}                   # running job -> device slot
        self._children: dict[int, TrainInChild] = {}       # running job -> its process
        self._locks: dict[int, FolderLock] = {}
        self._written: dict[int, float] = {}
        self._ended: list[int] = []

    # -- opening ------------------------------------------------------------------------------

    def open(self, workspace: Path | str, *, concurrency: int | None = None,
             confine: bool = False, realm: Realm | None = None,
             limits: ServerLimits | None = None) -> str:
        """Open the store in `workspace`, take back what a stopped server left (a running job
        is interrupted: it runs again first), and start what is pending. Returns the store's
        notice ("" when all was well). `realm` says whether the server is shared (owners
        apply) and confined; without it, `confine` confines paths to the workspace (the
        bundled demo dataset readable) without owners."""
        with self._lock:
            self.store = JobStore(workspace)
            self.concurrency = concurrency or default_concurrency()
            self.realm = realm if realm is not None else Realm(
                Path(workspace), confine=confine, public=(DEMO_DATASET_DIR,))
            self.confine_root = self.realm.workspace if self.realm.confine else None
            if limits is not None:
                self.limits = limits
            for job in self.store.all():
                if job.status == RUNNING and job.id not in self._sessions:
                    self.store.update(job.id, status=INTERRUPTED,
                                      message=f"The server stopped while this job ran (at "
                                              f"step {job.step}); it runs again first.")
            self._dispatch()
            return self.store.notice

    def _store(self) -> JobStore:
        if self.store is None:
            if self._default_workspace is None:
                raise AtelierError("The job store is not open.")
            self.open(self._default_workspace(),
                      realm=self._default_realm() if self._default_realm else None)
        return self.store

    # -- submitting and scheduling -------------------------------------------------------------

    def submit(self, config: TrainConfig, viewer: Viewer = LOCAL) -> tuple[Job, int]:
        """Queue `config` (checked as Start checks it); returns the job and its queue
        position (0: it runs now). On a shared server every path it names must be the
        viewer's to read (models, concepts) or write (a folder to continue from), and the
        server's limits apply (refused naming the limit and its option)."""
        check_supported(config)
        if (config.learning_rate_scheduler == LearningRateScheduler.CUSTOM
                and not self.allow_custom_code):
            raise ConfigError("learning_rate_scheduler: CUSTOM runs code named in the config "
                              "and is disabled on this server (shared/public mode). Choose "
                              "another schedule, or run the app locally / use the CLI.")
        store = self._store()
        confined = self._confines_output(viewer)
        # Refuses a path the viewer may not reach, naming the key (hub ids pass).
        check_config_access(config, Access(self.realm, viewer), output_confined=confined)
        limited = self.realm.shared and not viewer.admin
        if limited:
            self._check_steps(config)
        with self._lock:
            if limited:
                self._check_job_count(viewer)
            if not confined:  # a confined output is in the job's own folder: no clash
                self._refuse_output_clash(config)
            job = store.add(viewer.name, config.model_dump(mode="json"))
            if viewer.admin:
                self._admin_jobs.add(job.id)
            self._dispatch()
            return store.get(job.id), self.queue_position(job.id)

    def _confines_output(self, viewer: Viewer) -> bool:
        """A non-admin's output on a shared server goes into their own job folder."""
        return self.realm is not None and self.realm.shared and not viewer.admin

    def _owner_of(self, job: Job) -> Viewer:
        """The viewer who submitted `job`, as far as the server knows: an admin if they were
        one when it was submitted, or are one of the server's admins now."""
        admin = (not (self.realm and self.realm.shared) or job.id in self._admin_jobs
                 or (bool(job.owner) and job.owner in self.admins))
        return Viewer(job.owner, admin=admin)

    def _check_steps(self, config: TrainConfig) -> None:
        limit = self.limits.max_steps_per_job
        if limit is None:
            return
        total, per_epoch, _ = estimate_steps(config)
        if total > limit:
            raise ConfigError(
                f"epochs: {config.epochs:,} epochs x {per_epoch:,} steps per epoch = "
                f"{total:,} optimizer steps, more than this server allows per job "
                f"({limit:,}, {LIMIT_OPTIONS['max_steps_per_job']}); lower epochs or repeats, "
                "or raise batch_size.")

    def _check_job_count(self, viewer: Viewer) -> None:
        limit = self.limits.max_jobs_per_user
        if limit is None:
            return
        mine = [j for j in self.store.all()
                if j.owner == viewer.name and j.status in (*PENDING, RUNNING)]
        if len(mine) >= limit:
            raise ConfigError(
                f"You have {len(mine)} job(s) running or queued, as many as this server allows "
                f"per user ({limit}, {LIMIT_OPTIONS['max_jobs_per_user']}); wait for one to "
                "end, or cancel one, then start again.")

    def _refuse_output_clash(self, config: TrainConfig) -> None:
        """Two jobs never write one file: a chosen output path that a queued or running job
        also writes is refused before the job is queued."""
        if not config.output_model_destination:
            return  # the job's own folder
        from trainer.finetune import output_path
        mine = output_path(config).resolve()
        for job in self.store.all():
            if job.status not in (QUEUED, RUNNING, INTERRUPTED):
                continue
            other = job.config.get("output_model_destination")
            if not other:
                continue
            try:
                theirs = output_path(config.model_copy(update={
                    "output_model_destination": other,
                    "output_model_format": job.config.get("output_model_format",
                                                          config.output_model_format),
                    "training_method": job.config.get("training_method",
                                                      config.training_method)})).resolve()
            except Exception:
                theirs = Path(other).resolve()
            if theirs == mine:
                raise ConfigError(
                    f"output_model_destination: '{config.output_model_destination}' is also "
                    f"the output of job {job.id} ({job.status}); two jobs never write one "
                    "file. Choose another file name, or leave it empty to write into the "
                    "job's own folder.")

    def _dispatch(self) -> None:
        """Start pending jobs while a slot is free (called under the lock)."""
        if self.store is None:
            return
        while len(self._slots) < self.concurrency:
            waiting = [j for j in self.store.pending() if j.id not in self._slots]
            if not waiting:
                return
            self._start(waiting[0])

    def _start(self, job: Job) -> None:
        folder = self.store.folder(job.id)
        owner = self._owner_of(job)
        access = Access(self.realm, owner)
        confined = self._confines_output(owner)
        try:
            config = config_from_dict(job.config, warn=lambda message: None)
            check_supported(config)
        except AtelierError as error:
            self.store.update(job.id, status=FAILED, ended_at=time.time(),
                              error=f"The job's config does not validate: {error}",
                              message=f"The job's config does not validate: {error}")
            return
        try:  # again at the start: a dataset may have been deleted and made by another user
            check_config_access(config, access, output_confined=confined)
        except AtelierError as error:
            self.store.update(job.id, status=FAILED, ended_at=time.time(), error=str(error),
                              message=str(error))
            return
        again = job.started_at is not None  # it ran before the server stopped
        update = {"workspace_dir": str(folder)}
        if confined and config.output_model_destination:
            update["output_model_destination"] = str(confined_output(config, folder))
        note = job.note
        if again:
            step = resume.newest_backup_step(folder)
            resume.cut_metrics(folder, step or 0)
            update["continue_last_backup"] = step is not None
            note = (f"Continued from its backup at step {step} after a restart."
                    if step is not None else
                    "Restarted from step 0 after a restart: no backup had been written.")
        elif config.continue_last_backup:
            sources = [Path(config.workspace_dir)] + [
                self.store.folder(other.id) for other in self.store.all()
                if other.id != job.id and other.owner == job.owner
                and other.config.get("workspace_dir") == job.config.get("workspace_dir")]
            # Only folders the job's owner may write: never another user's backup.
            resume.seed_backup(folder, [s for s in sources if access.can_write(as_opened(s))])
        effective = config.model_copy(update=update)
        lock = FolderLock(folder)
        try:
            lock.acquire()
        except OSError as error:
            self.store.update(job.id, status=FAILED, ended_at=time.time(),
                              error=f"The job folder {folder} is in use: {error}",
                              message=f"The job folder {folder} is in use: {error}")
            return
        slot = min(set(range(self.concurrency)) - set(self._slots.values()))
        train_fn = self._train_fn
        if train_fn is None:
            env = child_environment(slot, self.concurrency, cuda_device_count())
            # The job folder is new: the owner's caches are where their earlier jobs left them
            env[DATA_CACHE_ENV] = str(access.data_cache_folder())
            train_fn = self._children[job.id] = TrainInChild(env, label=f"job {job.id}")
        # Paths were checked at submit; the session must not rewrite them (its confinement
        # would move a repo-relative demo path into the workspace).
        session = TrainingSession(self.allow_custom_code, None,
                                  listener=partial(self._on_event, job.id),
                                  on_end=partial(self._on_end, job.id),
                                  train_fn=train_fn)
        self._sessions[job.id] = session
        self._slots[job.id] = slot
        self._locks[job.id] = lock
        self.store.update(job.id, status=RUNNING, started_at=job.started_at or time.time(),
                          ended_at=None, error=None, note=note, message="Starting")
        try:
            session.start(effective)
        except AtelierError as error:  # a path refused by confinement at the last moment
            self._finish(job.id, FAILED, str(error))

    # -- events from the running jobs ---------------------------------------------------------

    def _on_event(self, job_id: int, event: Event) -> None:
        try:
            self._record_event(job_id, event)
        except sqlite3.Error as error:  # e.g. a full disk: the job's own files say more
            log.warning("Job %s: could not record a %s event: %s", job_id, event["type"], error)

    def _record_event(self, job_id: int, event: Event) -> None:
        kind = event["type"]
        store = self.store
        if kind == "started":
            store.update(job_id, record=False, total_steps=event["total_steps"])
        elif kind == "progress":
            now = time.monotonic()
            if now - self._written.get(job_id, 0.0) >= PROGRESS_WRITE_SECONDS:
                self._written[job_id] = now
                store.update(job_id, record=False, step=event["step"],
                             total_steps=event["total_steps"], loss=event["loss"],
                             smooth_loss=event["smooth_loss"])
        elif kind == "validation":
            best, at = event["best"]
            store.update(job_id, best_validation_loss=best, best_validation_step=at)
        elif kind == "backup":
            store.update(job_id, backup_step=event["step"], step=event["step"])
        elif kind == "saved":
            job = store.get(job_id)
            if job is not None and event["path"] not in job.outputs:
                store.update(job_id, outputs=[*job.outputs, event["path"]])

    def _on_end(self, job_id: int, state: JobState) -> None:
        status = {"finished": FINISHED, "stopped": STOPPED}.get(state.status, FAILED)
        self._finish(job_id, status, state.error, state)

    def _finish(self, job_id: int, status: str, error: str | None,
                state: JobState | None = None) -> None:
        with self._lock:
            values = {"status": status, "ended_at": time.time(), "error": error}
            if state is not None:
                values.update(step=state.step, total_steps=state.total_steps, loss=state.loss,
                              smooth_loss=state.smooth_loss, output_path=state.output_path,
                              message=state.message)
                job = self.store.get(job_id)
                outputs = list(job.outputs) if job else []
                if state.output_path and state.output_path not in outputs:
                    outputs.append(state.output_path)
                values["outputs"] = outputs
            elif error:
                values["message"] = error
            # The folder is free before the job reads as ended: whoever sees "stopped" may use
            # it at once (the CLI, a continued run).
            lock = self._locks.pop(job_id, None)
            if lock is not None:
                lock.release()
            try:
                self.store.update(job_id, **values)
            except sqlite3.Error as store_error:  # the slot is freed and the queue goes on
                log.error("Job %s ended (%s) but the database could not record it: %s",
                          job_id, status, store_error)
            self._slots.pop(job_id, None)
            self._children.pop(job_id, None)
            self._written.pop(job_id, None)
            self._ended.append(job_id)
            for old in self._ended[:-KEEP_ENDED_SESSIONS]:
                self._sessions.pop(old, None)
            del self._ended[:-KEEP_ENDED_SESSIONS]
            self._dispatch()

    # -- reading -----------------------------------------------------------------------------

    def jobs(self, viewer: Viewer = LOCAL) -> list[Job]:
        """The viewer's jobs, newest first; a running job with its live step and loss."""
        if self.store is None:
            return []
        return [self._live(job) for job in reversed(self.store.all()) if viewer.sees(job)]

    def _live(self, job: Job) -> Job:
        session = self._sessions.get(job.id)
        if job.status == RUNNING and session is not None:
            state = session.state()
            job.step, job.total_steps = state.step, state.total_steps
            job.loss, job.smooth_loss = state.loss, state.smooth_loss
            job.message = state.message
        return job

    def get(self, job_id: int, viewer: Viewer = LOCAL) -> Job:
        """The job, or AtelierError: another owner's job, and an id no job can have (text,
        a number too large for the database), read as no job at all."""
        number = job_number(job_id)
        job = (self.store.get(number) if self.store is not None and number is not None
               else None)
        if job is None or not viewer.sees(job):
            raise AtelierError(f"There is no job {shown_id(job_id)}.")
        return self._live(job)

    def queue_position(self, job_id: int) -> int | None:
        """1 = next to run; 0 = running; None = ended."""
        if job_id in self._slots:
            return 0
        order = [j.id for j in self.store.pending() if j.id not in self._slots]
        return order.index(job_id) + 1 if job_id in order else None

    def session_of(self, job_id: int) -> TrainingSession | None:
        return self._sessions.get(job_id)

    def process_id(self, job_id: int) -> int | None:
        """The pid of the process a running job trains in (None before it started, after it
        ended, and for a `train_fn` run in this process)."""
        child = self._children.get(job_id)
        return child.pid if child is not None else None

    def followed(self, viewer: Viewer = LOCAL) -> int | None:
        """The job the viewer's footer follows: their newest running job, else the last one
        that ended while this server ran."""
        if self.store is None:
            return None
        with self._lock:
            ids = list(self._sessions)
        visible = [i for i in ids if (job := self.store.get(i)) and viewer.sees(job)]
        running = [i for i in visible if self._sessions[i].running]
        if running:
            return max(running, key=lambda i: self._sessions[i]._started_at)
        return max(visible, default=None,
                   key=lambda i: self._ended.index(i) if i in self._ended else -1)

    def live_state(self, viewer: Viewer = LOCAL) -> JobState:
        job_id = self.followed(viewer)
        if job_id is not None:
            state = self._sessions[job_id].state()
            if state.running or not self._waiting(viewer):
                return state
        waiting = self._waiting(viewer)
        if waiting:
            return JobState(status="idle", message=f"{len(waiting)} job(s) queued; the next "
                                                   "starts when a running job ends.")
        return JobState()

    def _waiting(self, viewer: Viewer) -> list[Job]:
        if self.store is None:
            return []
        return [j for j in self.store.pending() if j.id not in self._slots and viewer.sees(j)]

    # -- acting on jobs ------------------------------------------------------------------------

    def cancel(self, job_id: int, viewer: Viewer = LOCAL) -> Job:
        """A queued job leaves the queue (stopped); a running one stops after its current
        step and saves."""
        with self._lock:
            job = self.get(job_id, viewer)
            if job.status in PENDING:
                return self.store.update(job.id, status=STOPPED, ended_at=time.time(),
                                         message="Cancelled before it ran."
                                         if job.started_at is None else
                                         f"Cancelled after a restart, at step {job.step}.")
            session = self._sessions.get(job.id)
            if job.status == RUNNING and session is not None:
                session.stop()
                return self.store.update(job.id, record=False,
                                         message="Stopping after the current step")
            raise AtelierError(f"Job {job.id} has already ended ({job.status}).")

    def move(self, job_id: int, direction: str, viewer: Viewer = LOCAL) -> int:
        """Move a queued job one place up or down among the viewer's queued jobs; returns its
        new queue position."""
        if direction not in ("up", "down"):
            raise AtelierError(f"direction: '{direction}' is neither 'up' nor 'down'.")
        with self._lock:
            job = self.get(job_id, viewer)
            if job.status != QUEUED:
                raise AtelierError(f"Job {job.id} is {job.status}, not queued: only a queued "
                                   "job moves.")
            queued = [j for j in self.store.pending() if j.status == QUEUED
                      and j.id not in self._slots and viewer.sees(j)]
            index = [j.id for j in queued].index(job.id)
            other = index - 1 if direction == "up" else index + 1
            if 0 <= other < len(queued):
                self.store.swap_positions(job.id, queued[other].id)
            return self.queue_position(job.id)

    def delete(self, job_id: int, viewer: Viewer = LOCAL) -> None:
        """Delete an ended job with its folder (an output written elsewhere, at a path the
        user chose, is theirs and stays)."""
        with self._lock:
            job = self.get(job_id, viewer)
            if job.status not in ENDED:
                raise AtelierError(f"Job {job.id} is {job.status}: cancel it first, then "
                                   "delete it.")
            self.store.delete(job.id)
            self._sessions.pop(job.id, None)
            folder = self.store.folder(job.id)
            if folder.is_dir():
                doomed = folder.with_name(f".deleting-{job.id}-{uuid.uuid4().hex[:8]}")
                os.rename(folder, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    # -- the page's single-session view (the job the viewer follows) -------------------------

    @property
    def running(self) -> bool:
        """A job runs now (whoever's): the GPU is taken."""
        return bool(self._slots)

    def start(self, config: TrainConfig, viewer: Viewer = LOCAL) -> tuple[Job, int]:
        return self.submit(config, viewer)

    def state(self, viewer: Viewer = LOCAL) -> JobState:
        return self.live_state(viewer)

    def stop(self, viewer: Viewer = LOCAL) -> bool:
        """Stop the viewer's followed job; False when none of theirs runs."""
        job_id = self.followed(viewer)
        session = self._sessions.get(job_id) if job_id is not None else None
        if session is None or not session.state().running:
            return False
        session.stop()
        return True

    def request(self, command: str, viewer: Viewer = LOCAL) -> None:
        job_id = self.followed(viewer)
        session = self._sessions.get(job_id) if job_id is not None else None
        if session is None:
            raise AtelierError("No training job of yours is running.")
        session.request(command)

    def job_config(self, viewer: Viewer = LOCAL) -> TrainConfig | None:
        """The followed job's config as submitted (what "Load these settings" fills)."""
        job_id = self.followed(viewer)
        if job_id is None:
            return None
        job = self.store.get(job_id)
        return config_from_dict(job.config, warn=lambda m: None) if job else None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing runs or waits; True if so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            if not self._slots and not (self.store and self.store.pending()):
                return True
            time.sleep(0.05)
        return False

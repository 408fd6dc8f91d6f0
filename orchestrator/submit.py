"""``submit``: check everything checkable, take the lease, store the spec, supervise.

Invariants:
- Nothing is written anywhere (storage or local) before the spec, the storage, the data, the
  device and the backbone folder have been checked; a failed check exits 2 naming the field.
- A resubmitted job whose ``data``, ``model`` or ``train`` section differs from the stored spec
  is refused (exit 2, naming each field); ``data.path`` may differ (the job moved: Colab, then a
  VM) as long as the file's content is the one the job trained on, and a changed content is
  refused naming ``data.path``. A completed job is reported, not retrained (exit 0).
- The lease is held from before the first write until the end; a live holder means exit 3.
- The first attempt's warm spare (orchestrator.spare) starts as soon as the spec reads, so its
  imports overlap the checks; it writes nothing that lasts, and is killed if submit ends first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from timellm_job.jobs import JobSpec, Phase, SpecError, load_spec, training_fields
from timellm_job.jobs.identity import diff_fields, without_new_defaults
from timellm_job.jobs.messages import log_to_stderr
from timellm_job.jobs.protocol import TRAINER_MODULE, ExitCode
from timellm_job.jobs.spec_files import spec_to_yaml
from timellm_job.orchestrator.identity import Identity, identify
from timellm_job.orchestrator.jobstate import JobState
from timellm_job.orchestrator.notice import NoticeWatcher
from timellm_job.orchestrator.notify import Notifier
from timellm_job.orchestrator.progress_view import ProgressView
from timellm_job.orchestrator.redaction import redacted_yaml
from timellm_job.orchestrator.spare import Spares
from timellm_job.orchestrator.supervisor import Supervisor
from timellm_job.storage import StorageError, Store, Unreachable, job_store, list_checkpoints
from timellm_job.storage import lease as leases
from timellm_job.storage.commit_strategy import strategy_for
from timellm_job.storage.documents import read_json
from timellm_job.storage.layout import RESULTS, SPEC, STATE, STOP
from timellm_job.storage.private import private_copy, write_private
from timellm_job.storage.store import NotAFolder

log = logging.getLogger(__name__)


class InputError(Exception):
    """Bad input: exit 2 with this message."""


@dataclass
class Prepared:
    spec: JobSpec
    job: Store
    workdir: Path
    identity: Identity


def trainer_argv(spec: JobSpec, local_spec: Path, attempt: int, memory_hint: dict | None = None,
                 lease: leases.Lease | None = None) -> list[str]:
    """The trainer's command: ``python -m timellm_job.trainer run``, under torchrun when ``train.nproc`` > 1
    (one node, no restarts of its own: restarts are the supervisor's); ``memory_hint``: the
    job's memory plan so far (JobState.memory_hint); ``lease``: the lease it writes under (its
    generation fences the trainer's commits)."""
    run = ["-m", TRAINER_MODULE, "run", str(local_spec), "--attempt", str(attempt)]
    if lease is not None:
        run += ["--lease", f"{lease.generation}:{lease.owner}"]
    if memory_hint:
        run += ["--memory-plan", json.dumps(memory_hint, sort_keys=True)]
    if spec.train.nproc == 1:
        return [sys.executable, *run]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(spec.train.nproc), "--max-restarts", "0", "--monitor-interval", "0.1", *run]


def lease_ttl_s() -> float:
    return float(os.environ.get("TIMELLM_JOB_LEASE_TTL_S", "60"))


def log_to_terminal() -> None:
    """The orchestrator's messages as a person reads them: ``[timellm-job HH:MM:SS] ...``."""
    log_to_stderr("[timellm-job %(asctime)s] %(message)s", "%H:%M:%S")


def workdir_root() -> Path:
    """This machine's folder for local copies (specs, trainer logs, heartbeats, sweeps)."""
    return Path(os.environ.get("TIMELLM_JOB_WORKDIR") or os.path.join(Path.home(), ".cache", "timellm-job"))


def workdir_for(spec: JobSpec) -> Path:
    key = hashlib.sha256(spec.storage.root.encode()).hexdigest()[:8]
    return workdir_root() / f"{spec.name}-{key}"


def check_create_only(job: Store, spec: JobSpec) -> str | None:
    """A store the lease can rely on writes objects only if absent; any other is refused unless
    ``storage.unsafe_single_writer`` is set. Returns the reason status flags (None: safe)."""
    if strategy_for(job).create_only:
        return None
    why = (f"{job.url} (fsspec protocol {job.protocols[0]!r}) cannot write an object only if absent: "
           f"two runtimes could both take the lease")
    if spec.storage.unsafe_single_writer:
        return why
    raise InputError(f"storage.root: {why}. Use a local folder, gs:// or s3://, or set "
                     f"storage.unsafe_single_writer: true if you guarantee that one runtime at a time runs this job")


def check_reachable(job: Store) -> None:
    """The storage root can be written: a local root's nearest existing folder is writable; an
    object store's bucket exists and answers (Unreachable if it does not answer within
    storage.store.PROBE_S). Nothing is created."""
    try:
        job.probe()
    except NotAFolder as exc:
        raise InputError(f"storage.root: {exc}") from None
    if job.is_local:
        path = Path(job.root)
        while not path.exists():
            path = path.parent
        if not path.is_dir() or not os.access(path, os.W_OK):
            raise InputError(f"storage.root: {path} is not a writable folder")
        return
    bucket = job.root.split("/", 1)[0]
    try:
        if not job.fs.exists(bucket):
            raise InputError(f"storage.root: bucket {bucket!r} does not exist or cannot be seen")
        job.list_dir("")
    except StorageError as exc:
        raise InputError(f"storage.root: {exc}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"storage.root: cannot reach {job.url}: {exc}") from None


def preflight(spec: JobSpec) -> dict:
    """The trainer's own checks (data, device, backbone, memory), in a subprocess: we never
    import torch. It reads the resolved spec from a private file: no option (credentials)
    reaches its argv. Returns the job's estimated footprint (trainer.footprint; {} if unknown)."""
    with private_copy("job.yaml", spec_to_yaml(spec).encode()) as path:
        result = subprocess.run([sys.executable, "-m", TRAINER_MODULE, "check", str(path)], capture_output=True, text=True)
    if result.returncode == 2:
        raise InputError(result.stderr.strip())
    if result.returncode != 0:
        raise InputError(f"the pre-flight check failed:\n{result.stderr.strip()[-2000:]}")
    if result.stderr.strip():  # warnings (a hub that does not answer): the user sees them
        print(result.stderr.strip(), file=sys.stderr)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    try:
        return json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {}


# what a job holds at most, in checkpoints: save_total_limit steps, the best and the one before it
# (kept until the newer verifies), a preempt checkpoint, and one being written
EXTRA_CHECKPOINTS = 4


def check_space(job: Store, spec: JobSpec, estimate: dict, allow_low_space: bool) -> str | None:
    """Refuse (InputError naming storage.save_total_limit) a job that would not fit the free
    space its store reports (a disk or a mount such as Drive; object stores report none).
    Returns a warning instead with ``allow_low_space``; None when it fits or cannot be told."""
    if not job.is_local or not estimate.get("checkpoint_bytes"):
        return None
    path = Path(job.root)
    while not path.exists():
        path = path.parent
    usage = shutil.disk_usage(path)
    if usage.total == 0:  # a filesystem that reports no size (/proc, some FUSE mounts): cannot tell
        return None
    free = usage.free
    held = sum(m.bytes for m in list_checkpoints(job).committed)
    cache = estimate.get("backbone_cache_bytes", 0) if spec.run.backbone_cache else 0
    count = spec.storage.save_total_limit + EXTRA_CHECKPOINTS
    need = cache + count * estimate["checkpoint_bytes"] - held
    if need <= free:
        return None
    gb = 1e9
    why = (f"storage.save_total_limit: the job will hold about {(need + held) / gb:.1f} GB at {job.url} "
           f"({f'a backbone cache of {cache / gb:.1f} GB and ' if cache else ''}up to {count} checkpoints of "
           f"{estimate['checkpoint_bytes'] / gb:.2f} GB: save_total_limit {spec.storage.save_total_limit} steps, the best "
           f"and the one before it, a preempt checkpoint and one being written), but only {free / gb:.1f} GB are free "
           f"there. Lower storage.save_total_limit, free space (on Google Drive, deleted files stay in its trash and "
           f"count against the quota until the trash is emptied), or pass --allow-low-space")
    if allow_low_space:
        return why
    raise InputError(why)


def _without_path(fields: dict) -> dict:
    return {**fields, "data": {k: v for k, v in (fields.get("data") or {}).items() if k != "path"}}


def recorded_data_sha256(job: Store) -> str | None:
    """The data content the job trained on, as it recorded it (state.json, else its newest
    checkpoint); None for a job of an earlier version, which did not record it."""
    try:
        doc = read_json(job, STATE) or {}
    except ValueError:
        doc = {}
    if isinstance(doc.get("data_sha256"), str):
        return doc["data_sha256"]
    for m in list_checkpoints(job).committed:
        if isinstance(m.metadata.get("data_sha256"), str):
            return m.metadata["data_sha256"]
    return None


def check_stored_spec(job: Store, spec: JobSpec, identity: Identity | None = None) -> None:
    """A job that exists must be resumed with the model it was started with, on the data it
    was started with, wherever that file lies now (InputError)."""
    try:
        stored = yaml.safe_load(job.read_bytes(SPEC).decode())
    except FileNotFoundError:
        return
    differences = diff_fields(_without_path(without_new_defaults({k: stored.get(k) for k in ("data", "model", "train")})),
                              _without_path(training_fields(spec)))
    if differences:
        raise InputError("this job exists with another spec; a resume must train the same model. "
                         "Differences:\n  " + "\n  ".join(differences) +
                         "\nUse another name (or root) for a different job.")
    recorded = recorded_data_sha256(job)
    if identity is not None and identity.data_sha256 and recorded and recorded != identity.data_sha256:
        raise InputError(f"data.path: {spec.data.path} holds other data than this job trained on (sha256 "
                         f"{identity.data_sha256[:12]}…, the job's {recorded[:12]}…); a resume must train on the "
                         "same data. Point data.path at the job's file, or use another name for a new job.")


def adopt(job: Store, spec: JobSpec) -> None:
    """Make a job folder that ``import`` filled a job: its spec (unless stored already) and a
    state document listing its checkpoints, so ``status``, ``export-best`` and ``submit`` see it."""
    if not job.exists(SPEC):
        try:
            job.create(SPEC, redacted_yaml(spec).encode(), private=True)
        except FileExistsError:
            pass
    identity = identify(spec, job)
    state = JobState(job, spec.name, identity.hashes)
    state.record_identity(identity.hash, identity.data_sha256)
    state.flush()


def prepare(spec_path: str, root: str | None, sets: tuple[str, ...], allow_low_space: bool = False,
            on_spec: Callable[[JobSpec], None] = lambda spec: None) -> Prepared:
    """Validate without writing: raises InputError (exit 2) naming what is wrong. ``on_spec``
    is called once the spec reads, before the checks that take time."""
    try:
        spec = load_spec(spec_path, root=root, sets=sets)
    except SpecError as err:
        raise InputError(str(err)) from None
    on_spec(spec)
    try:
        job = job_store(spec.storage.root, spec.name, spec.storage.options)
    except SpecError as err:
        raise InputError(str(err)) from None
    except StorageError as err:
        raise InputError(f"storage.root: {err}") from None
    check_create_only(job, spec)
    check_reachable(job)
    estimate = preflight(spec)
    identity = identify(spec, remember=True)  # the data read (pre-flight): what the job trains on
    check_stored_spec(job, spec, identity)
    low = check_space(job, spec, estimate, allow_low_space)
    if low:
        print(f"warning: {low}", file=sys.stderr)
    return Prepared(spec, job, workdir_for(spec), identity)


def submit(spec_path: str, root: str | None, sets: tuple[str, ...], allow_low_space: bool = False) -> int:
    log_to_terminal()
    spares = Spares()
    try:
        return _submit(spec_path, root, sets, allow_low_space, spares)
    finally:
        spares.discard()  # one no attempt claimed


def _submit(spec_path: str, root: str | None, sets: tuple[str, ...], allow_low_space: bool, spares: Spares) -> int:
    try:
        prep = prepare(spec_path, root, sets, allow_low_space, lambda spec: spares.configure(spec).start())
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except Unreachable as err:  # a network outage is not bad input: run submit again later
        print(f"error: storage.root: {err}; nothing was written", file=sys.stderr)
        return ExitCode.FAILED
    spec, job = prep.spec, prep.job
    results = read_json(job, RESULTS)
    state = JobState(job, spec.name, prep.identity.hashes)
    if results and state.status.phase == Phase.COMPLETED:
        test = results.get("test", {})
        log.info(f"job {spec.name} is completed already (best step {results.get('best_step')}, "
            f"test mse {test.get('mse')}, mae {test.get('mae')}): nothing to do")
        return ExitCode.OK
    previous = leases.read(job)  # a vanished orchestrator's, if any: it closes its attempt as lost

    def watching(holder: leases.Lease, ttl: float) -> None:
        log.info(f"the job's lease names pid {holder.pid} on {holder.host}: taking the job over once its lease "
            f"stays unrenewed for {ttl:.0f} s, judged on this machine's clock (a live holder renews it)")

    try:
        lease = leases.acquire(job, lease_ttl_s(), on_wait=watching)
    except leases.LeaseHeld as held:
        print(f"error: {held}", file=sys.stderr)
        return ExitCode.FENCED
    except StorageError as err:  # the first write: nothing was written
        print(f"error: storage.root: cannot write there: {err}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    code = None
    try:
        if not job.exists(SPEC):
            job.create(SPEC, redacted_yaml(spec).encode(), private=True)
        prep.workdir.mkdir(parents=True, exist_ok=True)
        local_spec = prep.workdir / "job.yaml"
        write_private(local_spec, spec_to_yaml(spec).encode())  # credentials: 0600, never in an argv
        if job.exists(STOP):  # a request that no running submit took: not for this one
            job.remove(STOP)
        state = JobState(job, spec.name, prep.identity.hashes)  # reloaded under the lease
        state.record_identity(prep.identity.hash, prep.identity.data_sha256)
        if state.unreadable:
            kept = state.keep_unreadable()
            log.warning(f"warning: {state.unreadable}: rebuilt from storage (checkpoints, results, logs)"
                + (f"; the unreadable file is kept as {kept}" if kept else ""))
        lost = state.close_lost(previous)
        if lost is not None:
            log.info(f"attempt {lost.number} of a runtime that vanished is closed: {lost.reason}")
        state.set_lease(lease)
        state.status.unsafe_single_writer = check_create_only(job, spec)
        if state.status.unsafe_single_writer:
            log.warning(f"warning: UNSAFE single-writer mode: {state.status.unsafe_single_writer}")
        log.info(f"job {spec.name}: storage {job.url}, lease generation {lease.generation} taken (pid {os.getpid()})")
        view = ProgressView()  # the live bar, or plain lines
        notifier = Notifier(spec.name, spec.run.notify, spec.run.healthcheck_url, spec.run.healthcheck_every_s) \
            if spec.run.notify or spec.run.healthcheck_url else None
        state.on_change = notifier.changed if notifier is not None else None
        supervisor = Supervisor(spec, job, state, lease, lease_ttl_s(),
                                lambda n, hint: trainer_argv(spec, local_spec, n, hint, lease),
                                prep.workdir, view.update, spares)
        watcher = None
        if spec.run.preemption_notice is not None:
            n = spec.run.preemption_notice
            state.status.preemption_notice = {"provider": n.provider, "url": n.url, "problem": None}

            def trouble(problem: str | None) -> None:
                if problem:
                    log.warning(f"warning: {problem}")
                state.status.preemption_notice = {**state.status.preemption_notice, "problem": problem}

            watcher = NoticeWatcher(n.provider, n.url, n.interval_s, supervisor.request_preemption, trouble).start()
        try:
            code = supervisor.run()
        except StorageError as err:
            log.error(f"error: storage failed for good, stopping (the trainer stops with us): {err}")
            code = ExitCode.FAILED
        finally:
            view.close()
            if notifier is not None:
                notifier.close()  # the final phase goes out (a few seconds at most)
            if watcher:
                watcher.stop()
                state.status.preemption_notice = None  # nobody watches once submit ends
        log.info(f"job {spec.name}: {state.status.phase.value}"
            f"{' (' + state.status.reason + ')' if state.status.reason else ''}; exit {code}")
        return code
    finally:
        if code != ExitCode.FENCED:  # a lost lease belongs to someone else now: leave it and the state
            state.set_lease(None)
            try:
                leases.release(job, lease)
                state.flush()
            except (StorageError, OSError) as exc:
                log.warning(f"warning: could not release the lease: {exc}")

"""``import``: commit upstream Time-LLM checkpoints as verified checkpoints of a job.

The source is one ``torch.save`` file, or a run folder laid out as the upstream fork writes it:
``checkpoint`` (early stopping's best model, a bare state dict) beside
``checkpoint_step_N/checkpoint.pt`` folders (full training state). A run folder is adopted
whole: its best as the job's ``best`` and its newest step as a ``step`` checkpoint, committed in
that order, so the job resumes from the step (newer) and keeps the imported best, whose
validation loss (the step's ``val_loss_min``) a new best must beat.

Invariants: nothing is written unless every file read matches the job's model by name and shape
(and the optimizer and scheduler too, unless ``weights_only``) and its position in training
(``epoch``, ``global_step``) lies within the job's; every result is committed through storage's
protocol like any checkpoint and verified against its manifest; a job whose lease is live is not
touched. A job that has checkpoints or results already is refused unless the caller says to add
the run (``add``); an import adds and never removes: it runs no retention, and the job's best
stays its best unless the imported one has a lower validation loss (storage.retention). Files are read from local disk memory-mapped (remote ones are streamed to a
local temporary file first), so the frozen LLM inside them is never read into memory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import tempfile
from pathlib import Path

from timellm_job.jobs import JobSpec
from timellm_job.storage import job_store, open_store
from timellm_job.storage import lease as leases
from timellm_job.storage.checkpoints import verify
from timellm_job.storage.manifest import Manifest
from timellm_job.trainer import distributed
from timellm_job.trainer.checkpoint_state import load_trainable
from timellm_job.trainer.checkpointing import Checkpointing
from timellm_job.trainer.components import Parts, TrainingState, build_parts, fresh_state, identify
from timellm_job.trainer.stopping import StopFlag
from timellm_job.trainer.telemetry import Reporter
from timellm_job.trainer.upstream import (
    ImportRefused,
    Upstream,
    mismatches,
    optimizer_problems,
    read_upstream,
    scheduler_problems,
)

BEST_FILE = "checkpoint"
STEP_DIR = re.compile(r"^checkpoint_step_(\d+)$")
STEP_FILE = "checkpoint.pt"

log = logging.getLogger(__name__)


class JobBusy(RuntimeError):
    pass


def has_history(job) -> str | None:
    """What the job holds already (checkpoints, results), in words; None for an empty job."""
    from timellm_job.storage import list_checkpoints
    from timellm_job.storage.layout import RESULTS

    held = [m.id for m in list_checkpoints(job).committed]
    parts = [f"{len(held)} checkpoint{'s' if len(held) != 1 else ''} ({', '.join(held[:3])}"
             f"{', ...' if len(held) > 3 else ''})"] if held else []
    if job.exists(RESULTS):
        parts.append("results.json (it is complete)")
    return " and ".join(parts) or None


def _check_position(spec: JobSpec, parts: Parts, up: Upstream, source: str) -> None:
    """The file's place in training must be one this job has: never negative, never past its end."""
    total, epochs = parts.total_steps, spec.train.epochs
    if not 0 <= up.global_step <= total:
        raise ImportRefused(f"global_step: {up.global_step} in {source} is not a step of this job "
                            f"(0 to {total}: train.epochs {epochs} x {parts.steps_per_epoch} steps per epoch)")
    if not 0 <= up.epoch <= epochs:
        raise ImportRefused(f"epoch: {up.epoch} in {source} is not an epoch of this job (0 to {epochs}, train.epochs)")


def _split(url: str) -> tuple[str, str]:
    folder, _, name = url.rstrip("/").rpartition("/")
    return folder or ".", name


@contextlib.contextmanager
def local_file(url: str, options: dict | None = None):
    """A local path holding the file at ``url``: itself on local disk, else a temporary copy."""
    folder, name = _split(url)
    store = open_store(folder, options)
    if store.is_local:
        path = Path(store.full(name))
        if not path.is_file():
            raise ImportRefused(f"{url}: no such file")
        yield path
        return
    if not store.exists(name):
        raise ImportRefused(f"{url}: no such file")
    with tempfile.TemporaryDirectory(prefix="timellm-import-") as tmp:
        store.download(name, Path(tmp) / name)
        yield Path(tmp) / name


def run_folder(url: str, options: dict | None = None) -> tuple[str | None, str | None] | None:
    """(best file, newest step file) of an upstream run folder, as URLs; None if ``url`` is not a
    folder."""
    store = open_store(url, options)
    entries = store.list_dir("")
    if not entries:
        return None
    best = BEST_FILE if any(n == BEST_FILE and t == "file" for n, t, _ in entries) else None
    steps = []
    for name, kind, _ in entries:
        found = STEP_DIR.match(name)
        if kind == "directory" and found and store.exists(f"{name}/{STEP_FILE}"):
            steps.append((int(found.group(1)), name))
    steps.sort()
    if best is None and not steps:
        raise ImportRefused(f"{url} holds no upstream checkpoint: expected '{BEST_FILE}' and/or "
                            f"'checkpoint_step_N/{STEP_FILE}'")
    return (store.url_of(best) if best else None, store.url_of(f"{steps[-1][1]}/{STEP_FILE}") if steps else None)


def read(url: str, options: dict | None) -> Upstream:
    with local_file(url, options) as path:
        return read_upstream(path)


def _check_model(state: TrainingState, up: Upstream, source: str) -> None:
    rows = mismatches(state.model, up.params)
    if rows:
        width = max(len(r[0]) for r in rows)
        table = "\n".join(f"  {n:<{width}}  {a:>22}  {b:>22}" for n, a, b in rows)
        raise ImportRefused(f"{source} does not fit this job's model:\n  {'parameter':<{width}}  "
                            f"{'this job':>22}  {'the file':>22}\n{table}\n"
                            "Match the job's model section (d_model, d_ff, num_tokens, pred_len, the backbone's "
                            "vocabulary) to the run that wrote the file.")


def _check_training_state(state: TrainingState, up: Upstream) -> None:
    problems = optimizer_problems(state.optimizer, up.optimizer) + scheduler_problems(state.scheduler, up.scheduler)
    if problems:
        raise ImportRefused("the optimizer or scheduler cannot carry over: " + "; ".join(problems) +
                            ". Add --weights-only to import the weights alone (fresh Adam and schedule).")


def _take_training_state(spec: JobSpec, parts: Parts, state: TrainingState, up: Upstream) -> None:
    """Adam, OneCycleLR and the position in training, from a full upstream checkpoint."""
    p = state.progress
    state.optimizer.load_state_dict(up.optimizer)
    state.scheduler.load_state_dict(up.scheduler)
    n = parts.steps_per_epoch
    p.global_step = up.global_step
    p.epoch = min(up.epoch, spec.train.epochs)
    p.batch = max(0, min(n, up.global_step - up.epoch * n))


def _commit(ckpt: Checkpointing, state: TrainingState, kind: str, source: str) -> Manifest:
    p = state.progress
    before = len(ckpt.saver.committed)
    ckpt.save(state, kind, None, wait=True)
    if len(ckpt.saver.committed) == before:
        raise ImportRefused(f"a {kind} checkpoint at step {p.global_step} exists already; nothing more was written")
    manifest = ckpt.saver.committed[-1]
    problems = verify(ckpt.job, manifest)
    if problems:
        raise ImportRefused(f"the checkpoint committed from {source} does not verify: {'; '.join(problems)}")
    return manifest


def import_checkpoint(spec: JobSpec, source: str, kind: str = "step", weights_only: bool = False,
                      source_options: dict | None = None, add: bool = False) -> list[Manifest]:
    """Import a file (as ``kind``) or a whole upstream run folder; returns what was committed.
    ``add``: into a job that has checkpoints or results already (else ImportRefused)."""
    # no backbone cache writes: an import that is refused must leave nothing behind
    spec = spec.model_copy(update={"run": spec.run.model_copy(update={"backbone_cache": False})})
    identity = identify(spec)
    job = job_store(spec.storage.root, spec.name, spec.storage.options)
    holder = leases.live_holder(job)
    if holder is not None:
        raise JobBusy(f"job {spec.name} is running (orchestrator pid {holder.pid} on {holder.host}); "
                      "stop it before importing")
    held = has_history(job)
    if held and not add:
        raise ImportRefused(f"job {spec.name} has {held} already: importing into it could change what it "
                            "resumes from. Give --add to add the run to it (its best replaces the job's only if "
                            "its validation loss is lower; nothing is deleted), or import into a new job name")
    # committed under the job's newest lease generation, so the import is ordered after the
    # checkpoints already there; a submit that starts meanwhile fences the import out
    fence = leases.Fence(job, leases.newest_generation(job))
    folder = run_folder(source, source_options)
    if folder is None:
        best_url, step_url = (source, None) if kind == "best" else (None, source)
    else:
        best_url, step_url = folder
    best = read(best_url, source_options) if best_url else None
    step = read(step_url, source_options) if step_url else None
    world = distributed.World()  # one process
    reporter = Reporter(job, attempt=0, main=False)  # an import writes no heartbeat or metrics
    parts = build_parts(spec, world, job, reporter.heartbeat, StopFlag(world), attempt=0)
    state = fresh_state(spec, world, parts)
    ckpt = Checkpointing(spec, job, identity, world, parts, reporter, attempt=0, fence=fence, background=False)
    ckpt.saver.retention = False  # an import adds; retention runs at the job's next commit
    for up, url in ((best, best_url), (step, step_url)):
        if up is not None:
            _check_model(state, up, url)
            _check_position(spec, parts, up, url)
    full = step if step is not None else best  # the file that carries the training state
    if not weights_only:
        _check_training_state(state, full)
        _take_training_state(spec, parts, state, full)
    p = state.progress
    val = full.val_loss_min
    if val is not None and math.isfinite(val):
        p.best_val, p.best_step = val, p.global_step
    committed = []
    # the best first: the step, committed after it at the same position, is the newer of the two
    for up, url, as_kind in ((best, best_url, "best"), (step, step_url, "step")):
        if up is None:
            continue
        load_trainable(state.model, up.params)
        m = _commit(ckpt, state, as_kind, url)
        committed.append(m)
        log.info("imported %s as checkpoint %s (step %d, epoch %d; %s; dropped %d frozen backbone entries)",
                 url, m.id, m.step, p.epoch, "weights only" if weights_only else "weights, Adam and OneCycleLR",
                 len(up.dropped))
    return committed

"""``import``: commit an upstream Time-LLM checkpoint as a verified checkpoint of a job.

Invariants: nothing is written unless every parameter matches the job's model by name and shape
(and the optimizer and scheduler too, unless ``weights_only``); the result is committed through
storage's protocol like any checkpoint, so ``submit`` resumes from it; a job whose lease is live
is not touched.
"""

from __future__ import annotations

import math
import os
import sys

from storage import lease as leases
from storage import open_store
from storage.manifest import Manifest
from trainer.loop import Trainer
from trainer.state import load_trainable
from trainer.upstream import ImportRefused, mismatches, optimizer_problems, read_upstream, scheduler_problems


class JobBusy(RuntimeError):
    pass


def read_source(url: str, options: dict | None = None) -> bytes:
    folder, name = os.path.split(url.rstrip("/"))
    try:
        return open_store(folder or ".", options).read_bytes(name)
    except FileNotFoundError:
        raise ImportRefused(f"{url}: no such file") from None


def import_checkpoint(spec, source: str, kind: str = "step", weights_only: bool = False,
                      source_options: dict | None = None) -> Manifest:
    # no backbone cache writes: an import that is refused must leave nothing behind
    spec = spec.model_copy(update={"run": spec.run.model_copy(update={"backbone_cache": False})})
    trainer = Trainer(spec, attempt=0, background_saves=False)
    holder = leases.read(trainer.job)
    if holder is not None and not holder.holder_is_dead():
        raise JobBusy(f"job {spec.name} is running (orchestrator pid {holder.pid} on {holder.host}); "
                      "stop it before importing")
    up = read_upstream(read_source(source, source_options))
    trainer.build()
    rows = mismatches(trainer.model, up.params)
    if rows:
        width = max(len(r[0]) for r in rows)
        table = "\n".join(f"  {n:<{width}}  {a:>22}  {b:>22}" for n, a, b in rows)
        raise ImportRefused(f"{source} does not fit this job's model:\n  {'parameter':<{width}}  "
                            f"{'this job':>22}  {'the file':>22}\n{table}\n"
                            "Match the job's model section (d_model, d_ff, num_tokens, pred_len, the backbone's "
                            "vocabulary) to the run that wrote the file.")
    problems = [] if weights_only else optimizer_problems(trainer.optimizer, up.optimizer) + \
        scheduler_problems(trainer.scheduler, up.scheduler)
    if problems:
        raise ImportRefused("the optimizer or scheduler cannot carry over: " + "; ".join(problems) +
                            ". Add --weights-only to import the weights alone (fresh Adam and schedule).")
    load_trainable(trainer.model, up.params)
    p = trainer.progress
    if not weights_only:
        trainer.optimizer.load_state_dict(up.optimizer)
        trainer.scheduler.load_state_dict(up.scheduler)
        n = trainer.steps_per_epoch
        p.global_step = up.global_step
        p.epoch = min(up.epoch, spec.train.epochs)
        p.batch = max(0, min(n, up.global_step - up.epoch * n))
    if up.val_loss_min is not None and math.isfinite(up.val_loss_min):
        p.best_val, p.best_step = up.val_loss_min, p.global_step
    trainer.save(kind, wait=True)
    committed = trainer.saver.committed[-1] if trainer.saver.committed else None
    if committed is None:
        raise ImportRefused(f"a {kind} checkpoint at step {p.global_step} exists already; nothing was written")
    print(f"imported {source} as checkpoint {committed.id} (step {p.global_step}, epoch {p.epoch}; "
          f"{'weights only' if weights_only else 'weights, Adam and OneCycleLR'}; "
          f"dropped {len(up.dropped)} frozen backbone entries)", file=sys.stderr)
    return committed

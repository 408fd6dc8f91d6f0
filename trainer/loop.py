"""The Time-LLM training loop: resumable bit for bit from any of its checkpoints.

Lifecycle of one trainer process (it knows nothing of restarts; it only resumes)::

    build -> resume from the newest verified checkpoint (or start fresh) -> plan memory
          -> epochs: train steps [step checkpoint every save_steps]
                     -> validate -> early stopping [best checkpoint at a new low]
          -> final step checkpoint -> reload best (verified) -> test -> results.json -> exit 0
    SIGTERM/SIGINT at any point: finish the step, commit a preempt checkpoint, exit 143/130.
    Out of memory (CUDA, or no memory plan fits): report the diagnosis, exit 4.

The parts: trainer.components (identity, what is built once, the live training state),
trainer.step (one optimizer step, in micro-batches), trainer.checkpointing (resume, save),
trainer.preemption, trainer.best, trainer.memory_steps, trainer.evaluation, trainer.telemetry
(the one reporter), trainer.stopping (signals).

Invariants:
- Everything that influences the result is in the checkpoint (trainer.checkpoint_state), and the
  data order is a function of (seed, epoch): resuming from any checkpoint continues the same
  computation. Checkpoints are taken between optimizer steps only.
- Validation and test use no randomness (eval mode, fixed order), so replaying them is exact.
- A job whose ``results.json`` exists (same spec hash) is complete: the trainer exits 0 at once.
- Under torchrun (``train.nproc`` > 1, trainer.distributed) every rank runs this same loop on
  its slice of each global batch; stop decisions and losses are agreed between ranks; rank 0
  alone builds the backbone cache, commits checkpoints (holding every rank's RNG state) and
  writes the heartbeat, metrics and results; all ranks resume from the checkpoint rank 0 chose.
"""

from __future__ import annotations

import logging
import math

import torch

from timellm_job.jobs import JobSpec
from timellm_job.jobs.protocol import ExitCode
from timellm_job.jobs.protocol import TrainerActivity as Activity
from timellm_job.storage import job_store
from timellm_job.storage.checkpoints import CorruptCheckpoint, load
from timellm_job.storage.documents import read_json, write_json
from timellm_job.storage.layout import RESULTS
from timellm_job.storage.lease import Fence, LeaseLost
from timellm_job.trainer import checkpoint_state, distributed, memory, preemption
from timellm_job.trainer.backbone import BackboneError
from timellm_job.trainer.best import best_to_test
from timellm_job.trainer.checkpointing import Checkpointing
from timellm_job.trainer.components import Parts, TrainingState, build_parts, fresh_state, identify
from timellm_job.trainer.data import DataError, train_batches
from timellm_job.trainer.evaluation import evaluate
from timellm_job.trainer.memory_steps import out_of_memory, plan_memory
from timellm_job.trainer.reporting import ProgressLine
from timellm_job.trainer.step import optimizer_step
from timellm_job.trainer.stopping import Preempted, StopFlag
from timellm_job.trainer.telemetry import Reporter

log = logging.getLogger(__name__)


class Trainer:
    """One trainer process: build, resume, plan, epochs, finish. What it is built from lives in
    its components (``parts``: built once; ``state``: what a checkpoint holds; ``checkpoints``;
    ``report``); the loop only orders them."""

    def __init__(self, spec: JobSpec, attempt: int = 1, background_saves: bool = True,
                 previous_plan: dict | None = None, lease: tuple[int, str] | None = None):
        self.spec, self.attempt, self.background_saves = spec, attempt, background_saves
        self.previous_plan = previous_plan  # the memory plan of the job's last attempt (its state)
        self.identity = identify(spec)  # the job is what it trains on: its data's content
        self.job = job_store(spec.storage.root, spec.name, spec.storage.options)
        # the orchestrator's lease (generation, owner): every commit checks it is still theirs
        self.fence = Fence(self.job, *lease) if lease else None
        self.world = distributed.from_env()
        self.stop = StopFlag(self.world)
        self.report = Reporter(self.job, attempt, main=self.world.main)  # the other ranks write nothing
        self.parts: Parts | None = None
        self.state: TrainingState | None = None
        self.checkpoints: Checkpointing | None = None
        self.plan: memory.MemoryPlan | None = None

    # ------------------------------------------------------------------ build, resume, plan
    def build(self) -> None:
        self.parts = build_parts(self.spec, self.world, self.job, self.report.heartbeat, self.stop, self.attempt)
        self.report.mark("backbone")
        self.state = fresh_state(self.spec, self.world, self.parts)
        self.checkpoints = Checkpointing(self.spec, self.job, self.identity, self.world, self.parts, self.report,
                                         self.attempt, self.fence, background=self.background_saves)
        self.report.mark("built")

    def resume(self, at_or_before: list[int] | None = None) -> None:
        resumed = self.checkpoints.resume(self.state, at_or_before)
        p, skipped = self.state.progress, resumed.skipped
        self.report.tb.text("attempts", f"attempt {self.attempt} started at step {p.global_step}"
                            + (f", resumed from checkpoint {resumed.manifest.id}" if resumed.manifest else ", from the start")
                            + (f" (skipped {len(skipped)} that did not verify)" if skipped else ""), p.global_step)
        self.report.mark("resumed")
        self.report.beat(force=True, activity=Activity.TRAINING, resumed_from=resumed.to_heartbeat(), skipped=skipped,
                         resume_exactness=resumed.exactness,
                         step=p.global_step, start_step=p.global_step, epoch=p.epoch, total_steps=self.parts.total_steps)

    def plan_memory(self) -> None:
        self.plan = plan_memory(self.spec, self.world, self.parts, self.state, self.previous_plan, self.report.heartbeat)

    def save(self, kind: str, wait: bool = False) -> None:
        self.checkpoints.save(self.state, kind, self.plan, wait)

    def optimizer_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, bool]:
        return optimizer_step(self.state, self.plan, self.world, self.parts.device, self.spec.data.features, x, y)

    # ------------------------------------------------------------------ epochs
    def train_epoch(self, line: ProgressLine) -> None:
        spec, p, world, state = self.spec, self.state.progress, self.world, self.state
        self.report.training_started()
        for b, (x, y, _) in train_batches(self.parts.splits.train, spec.train.batch_size, spec.train.seed, p.epoch,
                                          p.batch, world.rank, world.size):
            loss, skipped = self.optimizer_step(x, y)
            state.scheduler.step()  # the schedule follows the data, skipped steps included
            p.global_step, p.batch, p.skipped_steps = p.global_step + 1, b + 1, p.skipped_steps + skipped
            lr = state.scheduler.get_last_lr()[0]
            loss_v = distributed.mean(world, float(loss), self.parts.device)  # the global batch's loss
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"loss became {loss_v} at step {p.global_step}")
            self.report.record(step=p.global_step, epoch=p.epoch, loss=loss_v, lr=lr, **({"skipped": True} if skipped else {}))
            line.update(p.global_step, p.epoch, loss_v, lr)
            self.report.stepped(step=p.global_step, epoch=p.epoch, loss=loss_v, lr=lr, steps_per_s=round(line.rate, 4),
                                **({"peak_bytes": memory.peak_bytes(self.parts.device)} if self.parts.card.gpu else {}),
                                **({"skipped_steps": p.skipped_steps} if skipped else {}))
            if p.global_step % spec.storage.save_steps == 0:
                self.save("step")
            self.stop.check()

    def validate_epoch(self) -> None:
        spec, p = self.spec, self.state.progress
        self.report.beat(force=True, activity=Activity.VALIDATING, step=p.global_step, epoch=p.epoch)
        with self.report.evaluating():
            ev = evaluate(self.state.model, self.parts.splits.val, spec.train.eval_batch_size, self.parts.device,
                          spec.data.features, self.stop, on_batch=self.report.eval_beat)
        improved = p.best_val is None or ev.mse < p.best_val
        if improved:
            p.best_val, p.best_step, p.bad_epochs = ev.mse, p.global_step, 0
        else:
            p.bad_epochs += 1
        p.history.append({"epoch": p.epoch, "step": p.global_step, "val_mse": ev.mse, "val_mae": ev.mae})
        self.report.record(step=p.global_step, epoch=p.epoch, val_loss=ev.mse, val_mae=ev.mae)
        if self.world.main:
            log.info("epoch %d validation mse %.6f mae %.6f%s", p.epoch, ev.mse, ev.mae,
                     " (best)" if improved else f" (no improvement for {p.bad_epochs})")
        p.epoch, p.batch = p.epoch + 1, 0  # validated: the next checkpoint resumes after it
        p.stopped_early = p.bad_epochs >= spec.train.patience
        self.report.beat(force=True, activity=Activity.TRAINING, epoch=p.epoch, best_val=p.best_val, best_step=p.best_step)
        if improved:
            self.save("best")

    # ------------------------------------------------------------------ finish
    def finish(self) -> dict | list[int]:
        """Final checkpoint, the best model reloaded (verified) and tested; results written. A
        list instead: the best did not verify and must be trained again from there
        (trainer.best)."""
        p, ckpt = self.state.progress, self.checkpoints
        self.save("step", wait=True)
        self.report.beat(force=True, activity=Activity.TESTING, step=p.global_step)
        chosen = best_to_test(ckpt, p) if self.world.main else None
        decision = distributed.broadcast(self.world, chosen if not isinstance(chosen, tuple) else chosen[0].id)
        if isinstance(decision, list):  # retrain: the position at or before which to resume
            return decision
        if decision is None:
            raise CorruptCheckpoint("best", ["no best checkpoint was committed"])
        if isinstance(chosen, tuple):
            best, files = chosen
        else:  # another rank: the checkpoint rank 0 chose, verified again as it is read
            best = next(m for m in ckpt.committed() if m.id == decision)
            files = load(self.job, best, [checkpoint_state.MODEL_FILE])
        checkpoint_state.load_trainable(self.state.model, checkpoint_state.tensors_from(files[checkpoint_state.MODEL_FILE]))
        with self.report.evaluating():
            test = evaluate(self.state.model, self.parts.splits.test, self.spec.train.eval_batch_size, self.parts.device,
                            self.spec.data.features, self.stop, splits=self.parts.splits, on_batch=self.report.eval_beat)
        results = {"spec_hash": self.identity.hash, "data_sha256": self.identity.data_sha256, "best_checkpoint": best.id,
                   "scaling": self.parts.scaling, "best_step": best.step,
                   "val_loss": best.val_loss if best.val_loss is not None else p.best_val,
                   "epochs_trained": p.epoch, "global_step": p.global_step, "stopped_early": p.stopped_early,
                   "test": {"mse": test.mse, "mae": test.mae, "mse_data_units": test.mse_raw,
                            "mae_data_units": test.mae_raw, "samples": test.samples}}
        self.report.record(step=p.global_step, test_mse=test.mse, test_mae=test.mae)
        self.report.flush()
        if self.world.main:
            if self.fence is not None:
                self.fence.check()
            write_json(self.job, RESULTS, results)
            log.info("test mse %.6f mae %.6f (data units: mse %.4f mae %.4f) from %s", test.mse, test.mae,
                     test.mse_raw, test.mae_raw, best.id)
        return results

    def restart_from(self, at_or_before: list[int]) -> None:
        """Train again from the newest whole checkpoint at or before ``at_or_before`` (a lost
        best's position), or from the start. A checkpoint at exactly that position holds the
        best's own state (both are taken after that epoch's validation, with nothing computed
        between them): the best is committed again from it at once."""
        self.state = fresh_state(self.spec, self.world, self.parts)
        self.resume(at_or_before=at_or_before)
        p = self.state.progress
        if p.order() == list(at_or_before) and p.best_step == at_or_before[0]:
            self.save("best", wait=True)

    def preempted(self, signum: int) -> ExitCode:
        """Stopped by a signal: the step it stopped at committed (trainer.preemption), exit 143/130."""
        if self.state is not None and self.checkpoints is not None:
            preemption.commit_stopped_step(self.checkpoints, self.state, self.plan, signum)
        self.report.flush()
        self.report.beat(force=True, activity=Activity.PREEMPTED)
        return preemption.exit_code(signum)

    # ------------------------------------------------------------------ the process
    def run(self) -> int:
        try:
            code = self._run()
        except LeaseLost as lost:  # fenced: a newer lease holder owns the job; write nothing more
            log.info("error: %s; this trainer stops without writing", lost)
            self.report.beat(force=True, activity=Activity.FENCED, error=str(lost)[:500], exit_code=ExitCode.FENCED)
            code = ExitCode.FENCED
        self.report.beat(force=True, exit_code=code)  # what torchrun's own exit code hides
        distributed.close(self.world)
        return code

    def _run(self) -> int:
        self.stop.install()
        done = read_json(self.job, RESULTS)
        if done and done.get("spec_hash") in self.identity.hashes:
            log.info("the job is complete already: nothing to train")
            return ExitCode.OK
        try:
            self.build()
            self.stop.check()
            self.resume()
            self.plan_memory()
            while True:
                p = self.state.progress
                line = ProgressLine(self.parts.total_steps, p.global_step, quiet=not self.world.main)
                while p.epoch < self.spec.train.epochs and not p.stopped_early:
                    self.train_epoch(line)
                    self.validate_epoch()
                    self.stop.check()
                outcome = self.finish()
                if isinstance(outcome, dict):
                    break
                self.restart_from(outcome)  # the best did not verify: train it again
            self.report.beat(force=True, activity=Activity.COMPLETED)
            return ExitCode.OK
        except Preempted as pre:
            return self.preempted(pre.signum)
        except (torch.OutOfMemoryError, memory.OutOfPlans) as exc:
            return out_of_memory(self.spec, exc, self.plan, self.parts, self.state, self.report.heartbeat)
        except LeaseLost:
            raise
        except BaseException as exc:
            p = self.state.progress if self.state else None
            bad_input = isinstance(exc, (DataError, BackboneError))
            self.report.beat(force=True, activity=Activity.CRASHED, error=f"{type(exc).__name__}: {exc}"[:500],
                             exit_code=ExitCode.BAD_INPUT if bad_input else ExitCode.FAILED,
                             **({"step": p.global_step, "epoch": p.epoch} if p else {}))
            raise

"""The Time-LLM training loop: resumable bit for bit from any of its checkpoints.

Lifecycle of one trainer process (it knows nothing of restarts; it only resumes)::

    build -> resume from the newest verified checkpoint (or start fresh)
          -> epochs: train steps [step checkpoint every save_steps]
                     -> validate -> early stopping [best checkpoint at a new low]
          -> final step checkpoint -> reload best (verified) -> test -> results.json -> exit 0
    SIGTERM/SIGINT at any point: finish the step, commit a preempt checkpoint, exit 143/130.
    Out of memory (CUDA, or no memory plan fits): report the diagnosis, exit 4.

One optimizer step sees the global ``train.batch_size``, however it is computed: the memory
plan (trainer.memory, decided after resuming and before the first step) splits each process's
share into micro-batches whose losses, weighted by their share, are backpropagated one after
the other into the same gradients; fp16 compute scales the loss (torch.amp.GradScaler, its
state in every checkpoint); the backbone's blocks may be recomputed in the backward pass
(trainer.grad_checkpointing). Checkpoints are taken between optimizer steps only.

Invariants:
- Everything that influences the result is in the checkpoint (trainer.checkpoint_state), and the data order
  is a function of (seed, epoch): resuming from any checkpoint continues the same computation.
- Validation and test use no randomness (eval mode, fixed order), so replaying them is exact.
- A job whose ``results.json`` exists (same spec hash) is complete: the trainer exits 0 at once.
- Under torchrun (``train.nproc`` > 1, trainer.distributed) every rank runs this same loop on
  its slice of each global batch; stop decisions and losses are agreed between ranks; rank 0
  alone builds the backbone cache, commits checkpoints (holding every rank's RNG state) and
  writes the heartbeat, metrics and results; all ranks resume from the checkpoint rank 0 chose
  and verified, each verifying it again as it reads.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import sys
import time

import torch

from timellm_job.jobs import JobSpec, job_hashes, spec_hash
from timellm_job.jobs.protocol import ENV_HEARTBEAT, ExitCode
from timellm_job.jobs.protocol import TrainerActivity as Activity
from timellm_job.storage import job_store, list_checkpoints, load_newest
from timellm_job.storage.checkpoints import CorruptCheckpoint, Loaded, load
from timellm_job.storage.data_digest import DataUnreadable, data_sha256
from timellm_job.storage.documents import read_json, write_json
from timellm_job.storage.layout import RESULTS
from timellm_job.storage.lease import Fence, LeaseLost
from timellm_job.trainer import checkpoint_state, distributed, memory
from timellm_job.trainer.backbone import BackboneError, default_device, hub_cache_bytes, load_backbone
from timellm_job.trainer.backbone_cache import load_cached, prefetch
from timellm_job.trainer.best import BestCheckpoint
from timellm_job.trainer.data import DataError, data_options, load_splits, train_batches
from timellm_job.trainer.evaluation import evaluate, target
from timellm_job.trainer.memory_steps import MemorySteps
from timellm_job.trainer.model import TimeLLM
from timellm_job.trainer.preemption import Preemption
from timellm_job.trainer.reporting import HeartbeatWriter, MetricsLog, ProgressLine
from timellm_job.trainer.saver import CheckpointSaver
from timellm_job.trainer.stopping import Preempted, StopFlag
from timellm_job.trainer.telemetry import Telemetry
from timellm_job.trainer.tensorboard import TensorBoardLog

DOWNLOAD_LIMIT_S = 4 * 3600  # downloading 16 GB on a slow link; after it, silence reads as a hang


def _download_bytes(repo: str) -> dict:
    return {"download_bytes": hub_cache_bytes(repo)}


class Trainer(BestCheckpoint, Preemption, MemorySteps, Telemetry):
    """One trainer process: build, resume, plan, epochs, finish. Choosing the tested best is
    trainer.best's, stopping on a signal trainer.preemption's, the memory plan and an
    out-of-memory diagnosis trainer.memory_steps', metrics and eval timing trainer.telemetry's."""

    def __init__(self, spec: JobSpec, attempt: int = 1, background_saves: bool = True,
                 previous_plan: dict | None = None, lease: tuple[int, str] | None = None):
        self.spec, self.attempt = spec, attempt
        self.previous_plan = previous_plan  # the memory plan of the job's last attempt (its state)
        self.plan: memory.MemoryPlan | None = None
        try:  # the job is what it trains on: its data's content, wherever the file lies
            self.data_sha256 = data_sha256(spec.data.path, data_options(spec), remember=True)
        except DataUnreadable as exc:
            raise DataError(f"data.path: {exc}") from None
        self.hash = spec_hash(spec, self.data_sha256)
        self.hashes = job_hashes(spec, self.data_sha256)  # this version's, and earlier versions' (by path)
        self.job = job_store(spec.storage.root, spec.name, spec.storage.options)
        # the orchestrator's lease (generation, owner): every commit checks it is still theirs
        self.fence = Fence(self.job, *lease) if lease else None
        self.world = distributed.from_env()
        self.stop = StopFlag(self.world)
        main = self.world.main  # the other ranks write nothing
        self.heartbeat = HeartbeatWriter(os.environ.get(ENV_HEARTBEAT) if main else None)
        self.metrics = MetricsLog(self.job, attempt, enabled=main)
        self.tb = TensorBoardLog(self.job, attempt, enabled=main)  # with the tensorboard extra
        self.background_saves = background_saves
        self.startup = {"imported": time.time()}  # start-up marks, to the heartbeat
        self.spent = {"training_s": 0.0, "eval_s": 0.0}  # where this attempt's time went (goodput), to the heartbeat

    # ------------------------------------------------------------------ setup
    def build(self) -> None:
        spec = self.spec
        world = self.world
        self.device = distributed.init(world, default_device(spec.train.device))
        self.card = memory.card_of(self.device)
        self.compute_dtype = memory.compute_dtype(spec.model.compute_dtype, self.card)
        # the cached backbone is read and verified while the rest starts (imports, data)
        fetching = prefetch(spec.model, self.device, self.job) if spec.run.backbone_cache else None
        self.stop.device = self.device
        torch.manual_seed(spec.train.seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        self.heartbeat.beat(force=True, activity=Activity.LOADING, host=socket.gethostname(), attempt=self.attempt)
        self.splits = load_splits(spec.data, data_options(spec))
        self.steps_per_epoch = len(self.splits.train) // spec.train.batch_size
        if self.steps_per_epoch < 1:
            raise DataError(f"train.batch_size: {spec.train.batch_size} exceeds the "
                            f"{len(self.splits.train)} training samples")
        self.total_steps = self.steps_per_epoch * spec.train.epochs
        sc = self.splits.scaler
        self.scaling = {"columns": self.splits.columns, "mean": sc.mean.tolist(), "std": sc.std.tolist(),
                        "target": spec.data.target, "features": spec.data.features}
        for turn in ([0, 1] if world.distributed else [0]):  # rank 0 first: it alone writes the cache
            if (turn == 0) == world.main:
                pretrained = spec.model.backbone.pretrained
                measure = functools.partial(_download_bytes, pretrained) \
                    if pretrained and not os.path.isdir(pretrained) else None
                with self.heartbeat.keepalive(DOWNLOAD_LIMIT_S, "loading the backbone", measure):  # a download
                    if spec.run.backbone_cache:
                        self.backbone = load_cached(spec.model, self.device, self.job, fetching)
                    else:
                        self.backbone = load_backbone(spec.model, self.device)
            distributed.barrier(world)
        self.startup["backbone"] = time.time()
        self.heartbeat.beat(force=True, backbone_source=self.backbone.source)
        self._fresh_training_state()
        self.host_buffers = checkpoint_state.HostBuffers()
        self.saver = CheckpointSaver(self.job, self.hash, spec.storage.save_total_limit,
                                     background=self.background_saves, fence=self.fence,
                                     spec_hashes=self.hashes) if world.main else None
        self.startup["built"] = time.time()

    def _fresh_training_state(self) -> None:
        """The trainable model, optimizer, schedule and loss scaler as a new job starts them (the
        same seeds as any first start: a retrain from nothing computes what the first run did)."""
        spec, world = self.spec, self.world
        torch.manual_seed(spec.train.seed)  # trainable weights do not depend on how the backbone was built
        self.model = TimeLLM(spec.model, spec.data, self.backbone).to(self.device)
        self.model.train()
        self.train_model = distributed.wrap(world, self.model, self.device)
        if world.rank > 0:  # rank 0 continues the stream of a single process; the others differ
            torch.manual_seed(spec.train.seed + world.rank)
        params = list(self.model.trainable_state().values())
        self.optimizer = torch.optim.Adam(params, lr=spec.train.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=spec.train.learning_rate, total_steps=self.total_steps, pct_start=0.2)
        # dynamic loss scaling for fp16 compute (disabled, it is the identity)
        self.scaler = torch.amp.GradScaler(torch.device(self.device).type, enabled=self.compute_dtype == "fp16")
        self.batch_per_process = spec.train.batch_size // world.size
        self.progress = checkpoint_state.Progress()

    def resume(self, at_or_before: list[int] | None = None) -> None:
        """Continue from the newest checkpoint that verifies (with ``at_or_before``, the newest
        at that training position or earlier), reporting the ones skipped."""
        skipped: list[str] = []
        loaded = None
        if self.world.main:
            with self.heartbeat.keepalive(DOWNLOAD_LIMIT_S, "reading the checkpoint"):
                loaded = load_newest(self.job, spec_hash=self.hashes, skipped=skipped,  # never mix specs
                                     at_or_before=at_or_before)
            for line in skipped:
                print(f"skipping checkpoint {line}", file=sys.stderr, flush=True)
        chosen = distributed.broadcast(self.world, loaded.manifest.id if loaded else None)
        if chosen is not None and loaded is None:  # another rank: the same checkpoint, verified again
            manifest = next(m for m in list_checkpoints(self.job, spec_hash=self.hashes).committed if m.id == chosen)
            loaded = Loaded(manifest, load(self.job, manifest), [])
        resumed = None
        if loaded is not None:
            if self.saver is not None:
                self.saver.verified.add(loaded.manifest.id)  # read whole: every hash matched
            snap = checkpoint_state.read_files(loaded.files)
            self.progress = checkpoint_state.restore(snap, self.model, self.optimizer, self.scheduler, self.world.rank,
                                               self.scaler)
            resumed = {"id": loaded.manifest.id, "step": loaded.manifest.step}
            if self.world.main:
                print(f"resumed from checkpoint {loaded.manifest.id} (step {loaded.manifest.step}, "
                      f"epoch {self.progress.epoch}, batch {self.progress.batch})", file=sys.stderr, flush=True)
        p = self.progress
        self.tb.text("attempts", f"attempt {self.attempt} started at step {p.global_step}"
                     + (f", resumed from checkpoint {resumed['id']}" if resumed else ", from the start")
                     + (f" (skipped {len(skipped)} that did not verify)" if skipped else ""), p.global_step)
        self.startup["resumed"] = time.time()
        self.heartbeat.beat(force=True, activity=Activity.TRAINING, resumed_from=resumed, skipped=skipped, step=p.global_step,
                            start_step=p.global_step, epoch=p.epoch, total_steps=self.total_steps)

    # ------------------------------------------------------------------ checkpoints
    def save(self, kind: str, wait: bool = False) -> None:
        """Every rank calls it (their RNG states are gathered); rank 0 commits. With ``wait``
        the checkpoint is committed on return, on every rank."""
        p = self.progress
        rng = distributed.gather(self.world, checkpoint_state.rng_capture())
        if self.saver is not None:
            # a slow store is not a hang: beat while waiting on a write, for one heartbeat timeout
            with self.heartbeat.keepalive(self.spec.run.heartbeat_timeout_s, "checkpoint write"):
                self.saver.wait()  # the host buffers are reused: the previous write must be done
                extra = {"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}
                snap = checkpoint_state.capture(self.model, self.optimizer, self.scheduler, p, self.host_buffers, rng, extra)
                meta = {"epoch": p.epoch, "batch": p.batch, "best_val": p.best_val, "attempt": self.attempt,
                        "data_sha256": self.data_sha256,
                        "scaling": self.scaling, "memory_plan": self.plan.to_json() if self.plan else None}
                if kind == "best":
                    meta["val_loss"] = p.best_val
                self.saver.submit(snap, p.global_step, kind, p.order(), meta, wait=wait)
                self._flush_reports()
        if wait:
            distributed.barrier(self.world)

    # ------------------------------------------------------------------ the loop
    def optimizer_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """One optimizer step over this process's share of a batch, in micro-batches; returns
        the share's loss and whether the loss scaler skipped the step (inf/nan gradients)."""
        features, n, micro = self.spec.data.features, x.shape[0], self.plan.micro_batch_size
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for start in range(0, n, micro):
            xs, ys = x[start:start + micro].to(self.device), y[start:start + micro].to(self.device)
            with distributed.no_sync(self.world, self.train_model, last=start + micro >= n):
                loss = torch.nn.functional.mse_loss(target(self.train_model(xs), features), target(ys, features))
                if micro < n:  # the batch's mean: every micro-batch holds the same number of values
                    loss = loss * (xs.shape[0] / n)
                self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if not self.scaler.is_enabled():
            self.optimizer.step()
            return total, False
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total, self.scaler.get_scale() < scale

    def train_epoch(self, progress_line: ProgressLine) -> None:
        spec, p, world = self.spec, self.progress, self.world
        mark = time.time()
        for b, (x, y, _) in train_batches(self.splits.train, spec.train.batch_size, spec.train.seed, p.epoch, p.batch,
                                          world.rank, world.size):
            loss, skipped = self.optimizer_step(x, y)
            self.scheduler.step()  # the schedule follows the data, skipped steps included
            p.global_step += 1
            p.batch = b + 1
            p.skipped_steps += skipped
            lr = self.scheduler.get_last_lr()[0]
            loss_v = distributed.mean(world, float(loss), self.device)  # the global batch's loss
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"loss became {loss_v} at step {p.global_step}")
            self._report(step=p.global_step, epoch=p.epoch, loss=loss_v, lr=lr,
                             **({"skipped": True} if skipped else {}))
            progress_line.update(p.global_step, p.epoch, loss_v, lr)
            now = time.time()
            self.spent["training_s"] += now - mark
            mark = now
            self.heartbeat.beat(step=p.global_step, epoch=p.epoch, loss=loss_v, lr=lr,
                                steps_per_s=round(progress_line.rate, 4), training_s=round(self.spent["training_s"], 3),
                                **({"peak_bytes": memory.peak_bytes(self.device)} if self.card.gpu else {}),
                                **({"skipped_steps": p.skipped_steps} if skipped else {}))
            if "first_step" not in self.startup:
                self.startup["first_step"] = time.time()
                self.heartbeat.beat(force=True, startup=self.startup)
            if p.global_step % spec.storage.save_steps == 0:
                self.save("step")
            self.stop.check()

    def validate_epoch(self) -> None:
        spec, p = self.spec, self.progress
        self.heartbeat.beat(force=True, activity=Activity.VALIDATING, step=p.global_step, epoch=p.epoch)
        with self._evaluating():
            ev = evaluate(self.model, self.splits.val, spec.train.eval_batch_size, self.device,
                          spec.data.features, self.stop, on_batch=self._eval_beat)
        improved = p.best_val is None or ev.mse < p.best_val
        if improved:
            p.best_val, p.best_step, p.bad_epochs = ev.mse, p.global_step, 0
        else:
            p.bad_epochs += 1
        p.history.append({"epoch": p.epoch, "step": p.global_step, "val_mse": ev.mse, "val_mae": ev.mae})
        self._report(step=p.global_step, epoch=p.epoch, val_loss=ev.mse, val_mae=ev.mae)
        if self.world.main:
            print(f"epoch {p.epoch} validation mse {ev.mse:.6f} mae {ev.mae:.6f}"
                  f"{' (best)' if improved else f' (no improvement for {p.bad_epochs})'}", file=sys.stderr, flush=True)
        p.epoch, p.batch = p.epoch + 1, 0  # validated: the next checkpoint resumes after it
        p.stopped_early = p.bad_epochs >= spec.train.patience
        self.heartbeat.beat(force=True, activity=Activity.TRAINING, epoch=p.epoch, best_val=p.best_val, best_step=p.best_step)
        if improved:
            self.save("best")

    def finish(self) -> dict | None:
        """Final checkpoint, the best model reloaded (verified) and tested; results written.
        None when the best has to be trained again (see :meth:`_best_to_test`)."""
        p = self.progress
        self.save("step", wait=True)
        self.heartbeat.beat(force=True, activity=Activity.TESTING, step=p.global_step)
        chosen = self._best_to_test() if self.world.main else None
        decision = distributed.broadcast(self.world, chosen if not isinstance(chosen, tuple) else chosen[0].id)
        if isinstance(decision, list):  # retrain: the position at or before which to resume
            self.retrain_from = decision
            return None
        if decision is None:
            raise CorruptCheckpoint("best", ["no best checkpoint was committed"])
        if isinstance(chosen, tuple):
            best, files = chosen
        else:  # another rank: the checkpoint rank 0 chose, verified again as it is read
            best = next(m for m in list_checkpoints(self.job, spec_hash=self.hashes).committed if m.id == decision)
            files = load(self.job, best, [checkpoint_state.MODEL_FILE])
        checkpoint_state.load_trainable(self.model, checkpoint_state.tensors_from(files[checkpoint_state.MODEL_FILE]))
        with self._evaluating():
            test = evaluate(self.model, self.splits.test, self.spec.train.eval_batch_size, self.device,
                            self.spec.data.features, self.stop, splits=self.splits, on_batch=self._eval_beat)
        results = {"spec_hash": self.hash, "data_sha256": self.data_sha256, "best_checkpoint": best.id,
                   "scaling": self.scaling, "best_step": best.step,
                   "val_loss": best.val_loss if best.val_loss is not None else p.best_val,
                   "epochs_trained": p.epoch, "global_step": p.global_step,
                   "stopped_early": p.stopped_early, "test": {
                       "mse": test.mse, "mae": test.mae, "mse_data_units": test.mse_raw,
                       "mae_data_units": test.mae_raw, "samples": test.samples}}
        self._report(step=p.global_step, test_mse=test.mse, test_mae=test.mae)
        self._flush_reports()
        if not self.world.main:
            return results
        if self.fence is not None:
            self.fence.check()
        write_json(self.job, RESULTS, results)
        print(f"test mse {test.mse:.6f} mae {test.mae:.6f} (data units: mse {test.mse_raw:.4f} "
              f"mae {test.mae_raw:.4f}) from {best.id}", file=sys.stderr, flush=True)
        return results

    def run(self) -> int:
        try:
            code = self._run()
        except LeaseLost as lost:  # fenced: a newer lease holder owns the job; write nothing more
            print(f"error: {lost}; this trainer stops without writing", file=sys.stderr, flush=True)
            self.heartbeat.beat(force=True, activity=Activity.FENCED, error=str(lost)[:500], exit_code=ExitCode.FENCED)
            code = ExitCode.FENCED
        self.heartbeat.beat(force=True, exit_code=code)  # what torchrun's own exit code hides
        distributed.close(self.world)
        return code

    def _run(self) -> int:
        self.stop.install()
        done = read_json(self.job, RESULTS)
        if done and done.get("spec_hash") in self.hashes:
            print("the job is complete already: nothing to train", file=sys.stderr, flush=True)
            return ExitCode.OK
        try:
            self.build()
            self.stop.check()
            self.resume()
            self.plan_memory()
            spec = self.spec
            while True:
                p = self.progress
                line = ProgressLine(self.total_steps, p.global_step, quiet=not self.world.main)
                while p.epoch < spec.train.epochs and not p.stopped_early:
                    self.train_epoch(line)
                    self.validate_epoch()
                    self.stop.check()
                if self.finish() is not None:
                    break
                self.restart_from(self.retrain_from)  # the best did not verify: train it again
            self.heartbeat.beat(force=True, activity=Activity.COMPLETED)
            return ExitCode.OK
        except Preempted as pre:
            return self._preempted(pre.signum)
        except (torch.OutOfMemoryError, memory.OutOfPlans) as exc:
            return self._out_of_memory(exc)
        except LeaseLost:
            raise
        except BaseException as exc:
            p = getattr(self, "progress", None)
            bad_input = isinstance(exc, (DataError, BackboneError))
            self.heartbeat.beat(force=True, activity=Activity.CRASHED, error=f"{type(exc).__name__}: {exc}"[:500],
                                exit_code=ExitCode.BAD_INPUT if bad_input else ExitCode.FAILED,
                                **({"step": p.global_step, "epoch": p.epoch} if p else {}))
            raise

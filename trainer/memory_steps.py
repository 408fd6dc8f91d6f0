"""The trainer's memory steps: the plan put in force before the first step (probing the GPU
where there is one), and the diagnosis when memory runs out.

Part of the trainer (trainer.loop's ``Trainer`` mixes it in). The planning itself, a pure
function of the card, the spec and the last attempt's plan, is trainer.memory's.

Invariants:
- Rank 0 decides the plan; every rank follows it (broadcast), and the heartbeat carries it.
- A probe leaves no trace in the training state (no gradients, no optimizer state, no RNG draw
  that the run would see).
- Out of memory is a diagnosis, not a crash: exit 4 with the heartbeat's ``oom``.
"""

from __future__ import annotations

import sys

import torch

from timellm_job.jobs.protocol import ExitCode
from timellm_job.jobs.protocol import TrainerActivity as Activity
from timellm_job.trainer import distributed, memory
from timellm_job.trainer.data import train_batches
from timellm_job.trainer.evaluation import target
from timellm_job.trainer.grad_checkpointing import set_gradient_checkpointing


class MemorySteps:
    def plan_memory(self) -> None:
        """Decide the memory plan (rank 0 decides, every rank follows) and put it in force."""
        plan = None
        if self.world.main:
            probe = self._probe if self.card.gpu else None
            checkpointing = memory.checkpointing(self.spec.train.gradient_checkpointing, self.card)
            plan = memory.decide(self.spec, self.card, self.compute_dtype, checkpointing, self.batch_per_process,
                                 self.previous_plan, probe)
        self.plan = distributed.broadcast(self.world, plan)
        set_gradient_checkpointing(self.backbone.model, self.plan.gradient_checkpointing)
        if self.world.main:
            print(f"memory plan: {self.plan.describe()}", file=sys.stderr, flush=True)
        self.heartbeat.beat(force=True, memory_plan=self.plan.to_json())

    def _probe(self, micro: int, checkpointing: bool) -> int:
        """Peak GPU memory of one forward + backward at ``micro`` samples (plus the optimizer's
        moments, when they do not exist yet); leaves no trace in the training state."""
        set_gradient_checkpointing(self.backbone.model, checkpointing)
        _, (x, y, _) = next(iter(train_batches(self.splits.train, micro, self.spec.train.seed, 0, 0)))
        params = list(self.model.trainable_state().values())
        with memory.no_trace(self.device):
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                out = self.model(x.to(self.device))
                loss = torch.nn.functional.mse_loss(target(out, self.spec.data.features),
                                                    target(y.to(self.device), self.spec.data.features))
                loss.backward()
                del out, loss
                peak = memory.peak_bytes(self.device)
            finally:
                for param in params:
                    param.grad = None
        if not self.optimizer.state:
            peak += 2 * sum(param.numel() * param.element_size() for param in params)  # Adam's moments
        return peak


    def _out_of_memory(self, exc: BaseException) -> int:
        """A diagnosis, not a crash: what ran out, at which plan, and what to change."""
        card = getattr(self, "card", None) or memory.card_of(getattr(self, "device", "cpu"))
        planning = str(exc) if isinstance(exc, memory.OutOfPlans) else None
        evaluating = self.heartbeat.doc.evaluating
        diag = memory.diagnose(self.spec, self.plan, card, getattr(self, "device", "cpu"), planning, evaluating)
        p = getattr(self, "progress", None)
        print(diag["reason"], file=sys.stderr, flush=True)
        self.heartbeat.beat(force=True, activity=Activity.CRASHED, oom=diag, error=diag["reason"][:500],
                            exit_code=ExitCode.OUT_OF_MEMORY, **({"step": p.global_step, "epoch": p.epoch} if p else {}))
        return ExitCode.OUT_OF_MEMORY

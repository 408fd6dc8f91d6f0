"""``python -m timellm_job.trainer run|check|import JOB.yaml [--root URL] [--set k=v ...]``, or ``spare``

import: commit an upstream Time-LLM checkpoint as the job's (exit 2 when it does not fit).
run: train the job (resuming from its newest verified checkpoint); exit 0 done, 2 bad input,
4 out of memory (the diagnosis is the last line), 143/130 preempted by SIGTERM/SIGINT, 1 anything else.
check: the pre-flight checks that need torch or the data (device, data length, backbone folder,
what fits in memory); exits 0 when all is well, printing the job's estimated footprint as one
JSON line on standard output (trainer.footprint; ``{}`` when it cannot be sized), else one line
per problem on standard error and exit 2.
spare: a warm spare (trainer.spare): imports, then waits to be claimed as some attempt's ``run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from timellm_job.jobs import SpecError, load_spec
from timellm_job.jobs.messages import log_to_stderr
from timellm_job.jobs.protocol import ENV_HEARTBEAT, ExitCode

log = logging.getLogger("timellm_job.trainer")

STARTUP_LIMIT_S = 600  # imports that take longer than this are a hang


def _args(argv):
    ap = argparse.ArgumentParser(prog="python -m timellm_job.trainer")
    ap.add_argument("command", choices=["run", "check", "import"])
    ap.add_argument("spec")
    ap.add_argument("source", nargs="?", help="import: an upstream Time-LLM checkpoint or run folder (path or URL)")
    ap.add_argument("--as", dest="kind", choices=["step", "best"], default="step")
    ap.add_argument("--weights-only", action="store_true")
    ap.add_argument("--add", action="store_true", help="import: into a job that has checkpoints or results already")
    ap.add_argument("--root")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--attempt", type=int, default=1)
    ap.add_argument("--lease", help="GENERATION:OWNER of the orchestrator's lease; every commit checks it (fencing)")
    ap.add_argument("--sync-saves", action="store_true", help="save checkpoints on the training thread")
    ap.add_argument("--memory-plan", type=json.loads, default=None,
                    help="run: the memory plan of the job's last attempt (JSON), with 'oom' if it ran out")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["spare"]:
        from timellm_job.trainer import spare

        return spare.main(argv[1:], main)
    a = _args(argv)
    log_to_stderr()  # the trainer's messages, as lines, to its log
    try:
        spec = load_spec(a.spec, root=a.root, sets=tuple(a.sets))
    except SpecError as err:
        log.error("%s", err)
        return ExitCode.BAD_INPUT
    from timellm_job.trainer import determinism

    determinism.environment(spec.train.deterministic)  # before torch is imported: before CUDA starts
    from timellm_job.trainer.backbone import BackboneError, HubUnreachable
    from timellm_job.trainer.data import DataError

    if a.command == "check":  # before every start: it imports no more than it needs
        from timellm_job.trainer.preflight import preflight

        estimate: dict = {}
        problems = preflight(spec, estimate)
        for p in problems:
            log.error("%s", p)
        if not problems:
            print(json.dumps(estimate, sort_keys=True))  # the result, on standard output
        return ExitCode.BAD_INPUT if problems else ExitCode.OK
    if a.command == "import":
        from timellm_job.storage import StorageError
        from timellm_job.trainer.importer import ImportRefused, JobBusy, import_checkpoint

        if not a.source:
            log.error("import: give the checkpoint or run folder to import (a path or URL)")
            return ExitCode.BAD_INPUT
        try:
            import_checkpoint(spec, a.source, a.kind, a.weights_only, spec.storage.options if "://" in a.source else None,
                              add=a.add)
            return ExitCode.OK
        except (ImportRefused, DataError, BackboneError) as err:
            log.error(f"error: {err}")
            return ExitCode.BAD_INPUT
        except StorageError as err:
            log.error(f"error: {a.source}: {err}")
            return ExitCode.BAD_INPUT
        except JobBusy as err:
            log.error(f"error: {err}")
            return ExitCode.FENCED  # another holds the job's lease
    # the first heartbeat comes before the heavy imports (torch, transformers: seconds on a slow
    # machine), and beats go on while they load: start-up is never read as a hang
    from timellm_job.trainer.reporting import HeartbeatWriter

    early = HeartbeatWriter(os.environ.get(ENV_HEARTBEAT) if os.environ.get("RANK", "0") == "0" else None)
    with early.keepalive(STARTUP_LIMIT_S, "starting"):
        from timellm_job.trainer.loop import Trainer
        from timellm_job.trainer.stopping import watch_parent

    watch_parent()
    try:
        lease = (int(a.lease.split(":", 1)[0]), a.lease.split(":", 1)[1]) if a.lease else None
        return Trainer(spec, attempt=a.attempt, background_saves=not a.sync_saves,
                       previous_plan=a.memory_plan, lease=lease).run()
    except (DataError, BackboneError) as err:
        log.error(f"bad input: {err}")
        return ExitCode.BAD_INPUT
    except HubUnreachable as err:  # transient: a crash the supervisor may retry, never bad input
        log.error(f"error: {err}")
        return ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())

"""``timellm-job sweep``: the sweep file read, then run by the engine asked for.

Invariants:
- A bad sweep file, an engine that is not installed, or (SkyPilot) a job a VM could not run is
  refused with exit 2 and a message naming what is wrong, before anything is written.
- The engines are orchestrator.sweep (local), sweep_ray and sweep_sky; each is imported only
  when asked for (Ray and SkyPilot are extras).
"""

from __future__ import annotations

import importlib.util
import sys

from timellm_job.jobs import SpecError
from timellm_job.jobs.protocol import ExitCode


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def run_sweep(sweep_file: str, root: str | None, engine: str, max_parallel: int | None) -> int:
    """The sweep's exit code: 0 every job completed, 1 any did not, 2 bad input, 130/143 stopped."""
    from timellm_job.jobs.sweep import load_sweep
    from timellm_job.orchestrator.submit import InputError, log_to_terminal, workdir_root

    try:
        plan = load_sweep(sweep_file, root=root)
    except SpecError as err:
        _error(f"{sweep_file}:\n{err}")
        return ExitCode.BAD_INPUT
    if engine == "ray" and importlib.util.find_spec("ray") is None:
        _error("--on ray: Ray is not installed here: pip install 'timellm-job[ray]'")
        return ExitCode.BAD_INPUT
    log_to_terminal()
    if engine == "ray":
        from timellm_job.orchestrator.sweep_ray import RayEngine

        return RayEngine(plan, max_parallel).run()
    if engine == "skypilot":
        from timellm_job.orchestrator.sweep_sky import SkyPilotEngine, SkyPilotError

        try:
            return SkyPilotEngine(plan).run()
        except InputError as err:
            _error(f"{sweep_file}: {err}")
            return ExitCode.BAD_INPUT
        except SkyPilotError as err:
            _error(str(err))
            return ExitCode.FAILED
    from timellm_job.orchestrator.sweep import LocalEngine

    return LocalEngine(plan, workdir_root() / "sweeps" / plan.name, max_parallel or 1).run()

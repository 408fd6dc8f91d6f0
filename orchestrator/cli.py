"""The ``timellm-job`` command line.

Exit codes: 0 completed (or nothing to do); 1 failed (a permanent error, the restart budget
spent, a crash loop, an export that does not verify); 2 bad input (named field, nothing
written); 3 another live orchestrator holds the job; 143/130 stopped by SIGTERM/SIGINT.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import click

from timellm_job.jobs import SpecError, load_spec
from timellm_job.jobs.messages import first_line
from timellm_job.jobs.protocol import TRAINER_MODULE, ExitCode
from timellm_job.orchestrator.identity import identify
from timellm_job.storage import StorageError, Unreachable, job_store

ROOT_HELP = "Storage root URL (overrides storage.root): a path, file://, gs://, s3://, memory://."


def _job_of(spec_path: str, root: str | None, sets: tuple[str, ...] = ()):
    try:
        spec = load_spec(spec_path, root=root, sets=sets)
        job = job_store(spec.storage.root, spec.name, spec.storage.options)
    except SpecError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    except StorageError as err:
        click.echo(f"error: storage.root: {err}", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    try:
        job.probe()
    except Unreachable as err:
        click.echo(f"error: storage.root: {err}", err=True)
        sys.exit(ExitCode.FAILED)
    except StorageError as err:  # a file where the folder would be: bad input
        click.echo(f"error: storage.root: {err}", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    return spec, job


class _Group(click.Group):
    """Unexpected errors in one line (``error: ...``, exit 1); the traceback only with --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as exc:
            if ctx.params.get("debug") or os.environ.get("TIMELLM_JOB_DEBUG"):
                raise
            first = first_line(exc, 500)
            what = "storage" if isinstance(exc, StorageError) else type(exc).__name__
            click.echo(f"error: {what}: {first} (run with --debug for the traceback)", err=True)
            sys.exit(ExitCode.FAILED)


EXIT_CODES = """\b
Exit codes:
  0    completed (or already completed); other commands: done
  1    failed: a permanent error, the restart budget spent, a crash
       loop, out of memory with no smaller plan; no such job; a
       checkpoint that does not verify; nothing to stop
  2    bad input: the message names the field; nothing was written
  3    another live orchestrator holds the job
  143  stopped by SIGTERM (130: SIGINT); the phase is preempted
"""


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(package_name="timellm-job")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error (else: one line).")
def main(debug: bool) -> None:
    """Train Time-LLM on compute that gets taken away: supervised, checkpointed, resumable."""


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--root", help=ROOT_HELP)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a field, e.g. train.epochs=3.")
@click.option("--allow-low-space", is_flag=True,
              help="Start even when the store reports less free space than the job is estimated to hold.")
def submit(spec: str, root: str | None, sets: tuple[str, ...], allow_low_space: bool) -> None:
    """Validate, take the job's lease, and train it to the end, restarting the trainer as needed.

    Run it again after a disconnect or a preemption: it resumes from the newest verified checkpoint.
    """
    from timellm_job.orchestrator.submit import submit as run_submit

    sys.exit(run_submit(spec, root, sets, allow_low_space=allow_low_space))


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--root", help=ROOT_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of tables.")
@click.option("--verify", is_flag=True, help="Hash every checkpoint against its manifest.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of the losses, restarts marked.")
def status(spec: str, root: str | None, as_json: bool, verify: bool, plot: str | None) -> None:
    """Show a job's phase, progress, attempts and checkpoints (reads storage only)."""
    from timellm_job.orchestrator.status_view import collect, render, to_json

    job_spec, job = _job_of(spec, root)
    if not job.exists("job.yaml") and not job.exists("state.json"):
        click.echo(f"error: no job {job_spec.name!r} under {job_spec.storage.root}", err=True)
        sys.exit(ExitCode.FAILED)
    doc = collect(job, job_spec.name, verify_hashes=verify, spec_hash=identify(job_spec, job).hashes)
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            click.echo("error: --plot needs matplotlib: pip install 'timellm-job[plot]'", err=True)
            sys.exit(ExitCode.FAILED)
        from timellm_job.orchestrator.plot import plot_losses
        from timellm_job.storage import open_store
        from timellm_job.storage.metrics_log import read_metrics

        buf = io.BytesIO()
        plot_losses(read_metrics(job), doc["attempts"], buf, f"job {job_spec.name}")
        folder, name = os.path.split(os.path.abspath(plot))
        open_store(folder).replace(name, buf.getvalue())
    if as_json:
        click.echo(to_json(doc))
    else:
        render(doc)
        if plot:
            click.echo(f"plot written to {plot}")
    if verify and any(c["valid"] is False for c in doc["checkpoints"]):
        sys.exit(ExitCode.FAILED)


@main.command("export-best", short_help="Export the best model, verified.")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--root", help=ROOT_HELP)
@click.option("--out", required=True, help="A folder or URL for model.safetensors, config.json, metrics.json.")
def export_best_cmd(spec: str, root: str | None, out: str) -> None:
    """Export the best checkpoint's model, verified against its manifest first."""
    from timellm_job.orchestrator.export import ExportError, export_best

    job_spec, job = _job_of(spec, root)
    try:
        metrics = export_best(job, out, job_spec.storage.options if "://" in out else None,
                              identify(job_spec, job).hashes)
    except (ExportError, StorageError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(ExitCode.FAILED)
    test = metrics.get("test") or {}
    click.echo(f"exported {metrics['checkpoint']} (step {metrics['step']}, val loss {metrics['val_loss']:.6f}"
               + (f", test mse {test['mse']:.6f} mae {test['mae']:.6f}" if test else "") + f") to {out}")


@main.command("import", short_help="Adopt an upstream Time-LLM checkpoint or run.")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.argument("source")
@click.option("--root", help=ROOT_HELP)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a field, e.g. train.epochs=3.")
@click.option("--as", "kind", type=click.Choice(["step", "best"]), default="step", show_default=True,
              help="For a single file: commit it as a step checkpoint (resume from it) or as the best.")
@click.option("--weights-only", is_flag=True, help="Import the parameters alone (fresh Adam and schedule).")
@click.option("--add", is_flag=True, help="Add the run to a job that has checkpoints or results already "
              "(refused without it); nothing of the job's is deleted, and its best is replaced only by a "
              "lower validation loss.")
def import_cmd(spec: str, source: str, root: str | None, sets: tuple[str, ...], kind: str, weights_only: bool,
               add: bool) -> None:
    """Import a checkpoint or a whole run of the upstream Time-LLM code, so `submit` resumes from it.

    SOURCE is a torch.save file (a dict with model/optimizer/scheduler/epoch/global_step, or a bare
    state dict), or a run folder as the upstream fork writes it (`checkpoint`, the best, beside
    `checkpoint_step_N/checkpoint.pt`): its best and its newest step are both adopted. Files are
    read with torch.load(weights_only=True) (numpy scalars allowed, nothing unpickled) and
    memory-mapped. A job that exists with another spec is refused (exit 2), as by submit; so is one
    that has checkpoints or results already, unless --add is given.
    """
    from timellm_job.orchestrator.submit import InputError, adopt, check_stored_spec

    job_spec, job = _job_of(spec, root, sets)  # validates the spec (exit 2) before torch is loaded
    try:
        check_stored_spec(job, job_spec, identify(job_spec, job))
    except InputError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    from timellm_job.jobs.spec_files import spec_to_yaml
    from timellm_job.storage.private import private_copy

    with private_copy("job.yaml", spec_to_yaml(job_spec).encode()) as resolved:  # no option in an argv
        argv = [sys.executable, "-m", TRAINER_MODULE, "import", str(resolved), source, "--as", kind]
        code = subprocess.call(argv + (["--weights-only"] if weights_only else []) + (["--add"] if add else []))
    if code == 0:
        adopt(job, job_spec)
    sys.exit(code)


@main.command("list", short_help="Every job under a storage root.")
@click.option("--root", default=".", show_default=True, help=ROOT_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON list instead of a table.")
def list_cmd(root: str, as_json: bool) -> None:
    """List every job under a storage root: phase, step/total, best val loss, last heartbeat."""
    from timellm_job.orchestrator.status_view import job_names, render_list, summary
    from timellm_job.storage import open_store

    try:
        store = open_store(root if "://" in root else os.path.abspath(os.path.expanduser(root)))
        rows = [summary(store.child(name), name) for name in job_names(store)]
    except StorageError as err:
        click.echo(f"error: --root: {err}", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        render_list(rows)


@main.command(short_help="Every point of a grid as an ordinary job, here, on Ray or on SkyPilot.")
@click.argument("sweep_file", metavar="SWEEP.yaml", type=click.Path(dir_okay=False))
@click.option("--root", help=ROOT_HELP + " (default: the base job's storage.root)")
@click.option("--on", "engine", type=click.Choice(["local", "ray", "skypilot"]), default="local", show_default=True,
              help="Where the jobs run.")
@click.option("--max-parallel", type=click.IntRange(min=1),
              help="Jobs at once. local: on this machine, one GPU each where there are GPUs (default 1); "
                   "ray: tasks in flight (default: as many as the cluster's resources hold).")
def sweep(sweep_file: str, root: str | None, engine: str, max_parallel: int) -> None:
    """Expand SWEEP.yaml (a base job and a grid of dotted fields) into ordinary jobs under one
    root and run them: running it again trains nothing that completed. Exit 0 when every job
    completed, 1 when any did not (the table says which), 2 for a bad sweep file."""
    from timellm_job.orchestrator.sweep_engines import run_sweep

    sys.exit(run_sweep(sweep_file, root, engine, max_parallel))


@main.command("table", short_help="Every job under a root as the paper lays out its results.")
@click.option("--root", default=".", show_default=True, help=ROOT_HELP)
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json"]), default="md", show_default=True)
def table_cmd(root: str, fmt: str) -> None:
    """One row per job under a root (dataset, horizon, seed, the sweep's fields, phase, test MSE and
    MAE normalized and in data units, best validation loss, goodput); in markdown, beneath them,
    the mean and spread over seeds per horizon and the average over horizons per dataset."""
    from timellm_job.orchestrator import results_table
    from timellm_job.storage import open_store

    try:
        store = open_store(root if "://" in root else os.path.abspath(os.path.expanduser(root)))
        table = results_table.rows(store)
    except StorageError as err:
        click.echo(f"error: --root: {err}", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    if fmt == "json":
        click.echo(json.dumps(table, indent=1))
    elif fmt == "csv":
        click.echo(results_table.as_csv(table), nl=False)
    else:
        click.echo(results_table.markdown(table), nl=False)


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--root", help=ROOT_HELP)
@click.option("--now", is_flag=True, help="Kill the trainer at once (no preempt checkpoint), as a second Ctrl-C.")
def stop(spec: str, root: str | None, now: bool) -> None:
    """Stop the job's running submit, from any machine: as on SIGTERM, it commits a preempt
    checkpoint and exits 143 (within a few seconds of the request). Exit 1: no submit runs it."""
    import socket

    from timellm_job.storage import lease as leases
    from timellm_job.storage.documents import write_json
    from timellm_job.storage.layout import STOP

    job_spec, job = _job_of(spec, root)
    holder = leases.live_holder(job)
    if holder is None:
        click.echo(f"error: no running submit holds job {job_spec.name!r}: nothing to stop", err=True)
        sys.exit(ExitCode.FAILED)
    write_json(job, STOP, {"requested_at": time.time(), "now": now, "host": socket.gethostname(), "pid": os.getpid()})
    click.echo(f"stop requested: the submit of job {job_spec.name} (pid {holder.pid} on {holder.host}) "
               + ("kills its trainer at once" if now else "commits a preempt checkpoint and exits 143"))


@main.command()
@click.argument("source")
@click.option("--input", "input_csv", required=True, help="A CSV with the data's columns; its last seq_len rows are read.")
@click.option("--out", help="Where the forecast CSV goes (default: standard output).")
@click.option("--root", help=ROOT_HELP)
def predict(source: str, input_csv: str, out: str | None, root: str | None) -> None:
    """Forecast the pred_len rows after the input's last seq_len rows, in the data's units.

    SOURCE is a job's spec (its best checkpoint is exported and verified first) or a folder
    written by export-best. The output CSV has the date column continued (when the input has
    one) and the forecast columns (every column for features M, the target for S and MS).
    """
    import tempfile

    from timellm_job.orchestrator.export import ExportError, export_best

    with tempfile.TemporaryDirectory(prefix="timellm-predict-") as tmp:
        export = source
        if source.endswith((".yaml", ".yml")):
            job_spec, job = _job_of(source, root)
            try:
                export_best(job, tmp, None, identify(job_spec, job).hashes)
            except (ExportError, StorageError) as err:
                click.echo(f"error: {err}", err=True)
                sys.exit(ExitCode.FAILED)
            export = tmp
        argv = [sys.executable, "-m", f"{TRAINER_MODULE}.predict", export, "--input", input_csv]
        sys.exit(subprocess.call(argv + (["--out", out] if out else [])))


def _job_over(job, name: str) -> bool:
    """No orchestrator runs the job and its phase is final for now (completed, failed,
    preempted, interrupted): ``logs -f`` has nothing more to wait for."""
    from timellm_job.orchestrator.status_view import summary

    now = summary(job, name)
    return now["host"] is None and now["phase"] in ("completed", "failed", "preempted", "interrupted")


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--root", help=ROOT_HELP)
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing as the log grows, the next attempt's too; return when the job ends.")
@click.option("--attempt", type=int, help="Which attempt (default: the latest).")
def logs(spec: str, root: str | None, follow: bool, attempt: int | None) -> None:
    """Print the trainer's log (copied to the job folder as the trainer runs)."""
    from timellm_job.storage.log_segments import log_attempts, read_log

    job_spec, job = _job_of(spec, root)

    def latest() -> int | None:
        found = log_attempts(job)
        if attempt is not None:
            return attempt if attempt in found else None
        return found[-1] if found else None

    shown, number = 0, latest()
    if number is None and not follow:
        click.echo(f"no trainer log yet for {job_spec.name}", err=True)
        sys.exit(ExitCode.FAILED)
    while True:
        over = follow and _job_over(job, job_spec.name)  # looked at before the last read: nothing is missed
        if number is not None:
            data = read_log(job, number)
            click.echo(data[shown:].decode(errors="replace"), nl=False)
            shown = len(data)
        newest = latest()
        if newest != number:  # the next attempt's log: follow it from its start
            number, shown = newest, 0
            continue
        if not follow or over:
            return
        time.sleep(2)


# one-line summaries for the command list, whole at any terminal width
for _command, _summary in ((submit, "Train a job to its end, resuming as needed."),
                           (status, "A job's phase, progress and checkpoints."),
                           (stop, "Stop a job's running submit, from anywhere."),
                           (predict, "Forecast from a job or an export."),
                           (logs, "Print or follow the trainer's log.")):
    _command.short_help = _summary


if __name__ == "__main__":
    main()

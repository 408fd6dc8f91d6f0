"""``status``: what a job is doing, read from storage alone (so it works from any machine).

The JSON form carries at least the contract's fields; the table is for people; the plot shows
training and validation loss with every restart and preemption marked.
"""

from __future__ import annotations

import json
import time
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from timellm_job.jobs.messages import duration, first_line
from timellm_job.jobs.protocol import Heartbeat
from timellm_job.jobs.spec import model_variant
from timellm_job.jobs.status import JobStatus, LeaseInfo, describe_plan, effective_phase, goodput
from timellm_job.orchestrator.jobstate import checkpoint_infos, fold_results, load_status, read_status
from timellm_job.storage import Store, list_checkpoints
from timellm_job.storage import lease as leases
from timellm_job.storage.checkpoints import summaries, verify
from timellm_job.storage.layout import BACKBONE, SPEC, STATE
from timellm_job.storage.set_apart import list_set_apart

STALE_S = 60.0  # a running job's state.json older than this is not current (its ETA is not shown)


def collect(job: Store, name: str, verify_hashes: bool = False, spec_hash: str | None = None) -> dict[str, Any]:
    status = load_status(job, name)
    listing = list_checkpoints(job, spec_hash=spec_hash)
    infos, best = checkpoint_infos(job, listing=listing)
    status.set_apart = [{"folder": k, "why": v} for k, v in sorted(listing.set_apart.items())]
    status.set_apart += [{"folder": f"checkpoints/{k}", "why": f"its manifest cannot be read: {v}"}
                         for k, v in sorted(listing.unreadable.items())]
    status.set_apart += [{"folder": n["folder"], "why": f"moved aside: {n.get('why')}", "moved": True}
                         for n in list_set_apart(job)]
    if verify_hashes:
        manifests = {m.id: m for m in listing.committed}
        for info in infos:
            info.valid = not verify(job, manifests[info.id], hashes=True)
    status.checkpoints = infos
    status.best = best or status.best
    holder = leases.read(job)
    live_one = leases.live_holder(job) if holder is not None else None  # watched, not clock-compared
    live = live_one is not None
    if live_one is not None:
        holder = live_one
    status.lease = LeaseInfo(owner=holder.owner, host=holder.host, pid=holder.pid,
                             expires_at=holder.expires_at) if live else None
    beat_time = status.heartbeat.time if status.heartbeat else None
    status.heartbeat_age_s = round(time.time() - beat_time, 1) if beat_time else None
    phase = effective_phase(status.phase, live)
    if phase is not status.phase:
        status.phase = phase
        gone = (f"its pid {holder.pid} on {holder.host} is gone" if holder is not None and holder.dead_here() else
                "its lease was not renewed while watched" if holder is not None else "it holds no lease")
        status.reason = (f"the orchestrator vanished: {gone}; last heartbeat "
                         f"{_age(status.heartbeat_age_s)} ago" if status.heartbeat_age_s is not None else
                         f"the orchestrator vanished: {gone}") + "; run submit again to resume"
    fold_results(status, job)
    open_attempt = status.attempts[-1] if status.attempts and status.attempts[-1].ended_at is None else None
    # an open attempt counts until now; one whose runtime is gone ended at its last heartbeat
    gone_at = (beat_time or open_attempt.started_at) if open_attempt is not None and not live else None
    goodput(status, gone_at if gone_at is not None else time.time())
    doc = status.to_json_dict()
    doc["backbone_cache"] = summaries(job, BACKBONE)
    doc["model"] = stored_variant(job)
    for a in doc["attempts"]:
        a.setdefault("exit_code", None)
        a.setdefault("signal", None)
    return doc


def stored_variant(job: Store) -> str | None:
    """Time-LLM or its LLM-free variant, from the job's stored spec (None: none stored, or unreadable)."""
    try:
        spec = yaml.safe_load(job.read_bytes(SPEC))
    except (FileNotFoundError, ValueError, yaml.YAMLError):
        return None
    return model_variant(spec.get("model")) if isinstance(spec, dict) else None


def job_names(root: Store) -> list[str]:
    """The jobs under a storage root: its folders holding a state document or a stored spec."""
    return [name for name, kind, _ in root.list_dir("")
            if kind == "directory" and (root.exists(f"{name}/{STATE}") or root.exists(f"{name}/{SPEC}"))]


def summary(job: Store, name: str) -> dict[str, Any]:
    """One line of ``list``: from the state document and the lease alone (no checkpoint listing).
    A job whose state.json cannot be read is shown as ``unreadable``, never an error."""
    return summary_and_status(job, name)[0]


def summary_and_status(job: Store, name: str) -> tuple[dict[str, Any], JobStatus | None]:
    """``summary``, and the status document it was read from (None when it could not be read)."""
    try:
        status, unreadable = read_status(job, name)
    except Exception as exc:  # noqa: BLE001 - one job's trouble never hides the others
        return {"name": name, "phase": "unreadable", "global_step": 0, "total_steps": None, "best_val_loss": None,
                "heartbeat_age_s": None, "host": None, "problem": first_line(exc)}, None
    holder = leases.live_holder(job)
    beat = status.heartbeat.time if status.heartbeat else None
    phase = "unreadable" if unreadable else effective_phase(status.phase, holder is not None).value
    return {"name": name, "phase": phase, "global_step": status.global_step,
            "total_steps": status.total_steps, "best_val_loss": status.best.val_loss if status.best else None,
            "heartbeat_age_s": round(time.time() - beat, 1) if beat else None,
            "host": holder.host if holder else None, **({"problem": unreadable} if unreadable else {})}, \
        None if unreadable else status


def render_list(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    t = Table(title="jobs")
    for col in ("name", "phase", "step", "best val loss", "heartbeat", "host"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["phase"], f"{r['global_step']}/{r['total_steps'] or '?'}",
                  f"{r['best_val_loss']:.6f}" if r["best_val_loss"] is not None else "-",
                  _age(r["heartbeat_age_s"]) + " ago" if r["heartbeat_age_s"] is not None else "-", r["host"] or "-")
    (console or Console()).print(t)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _short_plan(plan: dict | None) -> str:
    if not plan:
        return "-"
    peak = f" {plan['peak_bytes'] / 2**30:.1f}G" if plan.get("peak_bytes") else ""
    return (f"{plan['micro_batch_size']}/{plan['batch_per_process']} {plan['compute_dtype']}"
            f"{' ckpt' if plan['gradient_checkpointing'] else ''}{peak}{' (new)' if plan.get('note') else ''}")


def _span(seconds: float) -> str:
    """A part of the wall time: seconds under a minute (0.6 s), else [Nd ]HH:MM:SS."""
    return f"{seconds:.1f} s" if seconds < 60 else duration(seconds)


def render(doc: dict[str, Any], console: Console | None = None) -> None:
    if console is None:  # a log or a pipe is read later, not in an 80-column terminal: room for the tables
        probe = Console()
        console = probe if probe.is_terminal else Console(width=150)
    head = Table(title=f"job {doc['name']}", show_header=False, box=None)
    step, total = doc.get("global_step", 0), doc.get("total_steps")
    eta = "-"
    attempts = doc.get("attempts") or []
    current = attempts[-1] if attempts else None
    beat = Heartbeat.parse(doc.get("heartbeat")) or Heartbeat()
    rate = beat.steps_per_s  # the trainer's own rate: the log's ETA too
    stale = doc["phase"] in ("running", "restarting") and doc.get("updated_at") is not None \
        and time.time() - doc["updated_at"] > STALE_S
    if current and current.get("ended_at") is None and total and rate and not stale:
        eta = duration((total - step) / rate)
    detail = f" (state.json last written {_age(time.time() - doc['updated_at'])} ago: not current)" if stale else ""
    if doc["phase"] == "running" and beat.evaluating and not stale:
        done = f" {beat.eval_batch}/{beat.eval_batches}" if beat.eval_batches else ""
        detail = f" ({beat.activity}{done})"
    head.add_row("phase", f"[bold]{doc['phase']}[/bold]{detail}" + (f" ({doc['reason']})" if doc.get("reason") else ""))
    head.add_row("step", f"{step}/{total if total else '?'}  (ETA {eta})")
    head.add_row("epoch", str(doc.get("epoch", 0)))
    if beat.loss is not None:
        head.add_row("loss", f"{beat.loss:.4f} (lr {beat.lr:.2e})" if beat.lr is not None else f"{beat.loss:.4f}")
    best = doc.get("best")
    head.add_row("best", f"val loss {best['val_loss']:.6f} at step {best['step']} ({best['checkpoint']})" if best else "-")
    metrics = doc.get("metrics") or {}
    test = metrics.get("test")
    if test:
        of = metrics.get("checkpoint")
        other = f" of {of}, not of the best" if of and best and of != best["checkpoint"] else ""
        head.add_row("test" + other, f"mse {test['mse']:.6f} mae {test['mae']:.6f} "
                                     f"(data units: mse {test['mse_data_units']:.4f} mae {test['mae_data_units']:.4f})")
    if doc.get("rebuilt"):
        head.add_row("state", f"[yellow]{doc['rebuilt']}[/yellow]")
    head.add_row("heartbeat", _age(doc.get("heartbeat_age_s")) + " ago" if doc.get("heartbeat_age_s") is not None else "-")
    lease = doc.get("lease")
    head.add_row("lease", f"pid {lease['pid']} on {lease['host']}, expires "
                          f"{time.strftime('%H:%M:%S', time.localtime(lease['expires_at']))}" if lease else "free")
    if lease and lease.get("generation"):
        head.add_row("lease generation", str(lease["generation"]))
    if doc.get("unsafe_single_writer"):
        head.add_row("storage", f"[red]UNSAFE single-writer mode: {doc['unsafe_single_writer']}[/red]")
    head.add_row("restarts", str(doc.get("restarts", 0)))
    notice = doc.get("preemption_notice")
    if notice:
        head.add_row("preemption notice", f"[red]{notice['problem']}[/red]" if notice.get("problem") else
                     f"watching {notice['provider']} metadata")
    if doc.get("model"):
        head.add_row("model", doc["model"])
    plan = doc.get("memory_plan")
    head.add_row("memory plan", describe_plan(plan) if plan else "-")
    resumed = [a for a in attempts if a.get("resume_exactness")]
    if resumed:  # the newest resume: does the run continue bit for bit?
        exact = resumed[-1]["resume_exactness"]
        head.add_row("resume", exact if exact == "bit for bit" else f"[yellow]{exact}[/yellow]")
    good = doc.get("goodput")
    if good:
        parts = good["parts"]
        head.add_row("goodput", f"{good['share'] * 100:.0f}% useful" if good.get("share") is not None else "-")
        head.add_row("", f"of {_span(good['wall_s'])}: training {_span(parts['training_s'])}, "
                         f"start-up {_span(parts['startup_s'])}, retrained {_span(parts['retrained_s'])}, "
                         f"validation/test {_span(parts['eval_s'])}, idle {_span(parts['idle_s'])}")
    caches = doc.get("backbone_cache") or []
    head.add_row("backbone cache", ", ".join(f"{c['key'][:12]}… {c['bytes'] / 1e6:.1f} MB" for c in caches)
                 if caches else "none")
    console.print(head)
    if attempts:
        t = Table(title="attempts")
        for col in ("#", "started", "pid", "backbone", "memory plan", "resumed from", "steps", "useful", "exit", "reason"):
            t.add_column(col)
        for a in attempts:
            rf = a.get("resumed_from")
            ex = a.get("signal") or (str(a["exit_code"]) if a.get("exit_code") is not None else
                                     ("-" if a.get("ended_at") is not None else
                                      "gone" if doc["phase"] == "interrupted" else "running"))
            t.add_row(str(a["number"]), time.strftime("%H:%M:%S", time.localtime(a["started_at"])),
                      f"{a.get('pid')}{' warm' if a.get('warm_spare') else ''}",
                      (a.get("backbone_source") or "-").split(":", 1)[0], _short_plan(a.get("memory_plan")),
                      (f"{rf['id']}" + ("" if a.get("resume_exactness") in (None, "bit for bit")
                                         else " (up to float order)")) if rf else "-", f"{a.get('start_step', '-')}→{a.get('end_step', '-')}",
                      f"{a['goodput']['share'] * 100:.0f}%" if (a.get("goodput") or {}).get("share") is not None else "-", ex,
                      (a.get("reason") or "") + (f" [skipped {len(a['skipped_checkpoints'])} bad]"
                                                  if a.get("skipped_checkpoints") else ""))
        console.print(t)
    for apart in doc.get("set_apart") or []:
        what = "set apart" if apart.get("moved") else "not this job's checkpoint"
        console.print(f"[yellow]{what}: {apart['folder']}: {apart['why']}[/yellow]")
    if doc.get("checkpoints"):
        t = Table(title="checkpoints")
        for col in ("id", "kind", "step", "size", "verified"):
            t.add_column(col)
        for c in doc["checkpoints"]:
            valid = {True: "[green]yes[/green]", False: "[red]NO[/red]", None: "not checked (--verify)"}[c.get("valid")]
            t.add_row(c["id"], c["kind"], str(c["step"]), f"{c['bytes'] / 1e6:.2f} MB", valid)
        console.print(t)


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, sort_keys=True)

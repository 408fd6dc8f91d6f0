"""``timellm-job table``: every job under a root as the paper lays out its results, from storage
alone, from any machine.

One row per job: its dataset, horizon and seed (from the spec it stored), the grid's fields
where it belongs to a sweep, its phase (with step/total while it is unfinished), test MSE and MAE
(normalized, and in the data's units), the best validation loss and its goodput. Beneath the
rows (markdown): per dataset and horizon the mean and spread (sample standard deviation) over
the jobs that completed, which differ only in their seed where they come from one sweep; and per
dataset the average of those means over its horizons, as the paper reports them.

Invariants:
- Read-only: nothing is written, no lease is taken.
- One job's trouble never hides the others: a job whose documents cannot be read is a row whose
  phase says so.
- No number is invented: a job without results has nulls and is left out of every average; an
  average says over how many jobs it was taken.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from pathlib import PurePosixPath
from typing import Any

import yaml

from timellm_job.jobs.messages import first_line
from timellm_job.jobs.spec import model_variant
from timellm_job.orchestrator.status_view import job_names, summary_and_status
from timellm_job.storage import Store
from timellm_job.storage.documents import read_json
from timellm_job.storage.layout import RESULTS, SPEC

SWEEP_FIELDS = "sweep.json"  # in a job's folder, where a sweep wrote it: {"sweep": name, "fields": {...}}


def _dataset(data: dict) -> str:
    kind = data.get("kind") or "custom"
    return kind if kind != "custom" else PurePosixPath(str(data.get("path") or "custom")).stem


def row(job: Store, name: str) -> dict[str, Any]:
    """One job's row; never raises for what a job folder holds."""
    line, status = summary_and_status(job, name)
    out: dict[str, Any] = {"name": name, "phase": line["phase"], "dataset": None, "model": None, "pred_len": None,
                           "seed": None,
                           "fields": {}, "global_step": line.get("global_step"), "total_steps": line.get("total_steps"),
                           "test": None, "test_data_units": None, "best_val_loss": line.get("best_val_loss"),
                           "goodput": None, **({"problem": line["problem"]} if "problem" in line else {})}
    try:
        try:
            spec = yaml.safe_load(job.read_bytes(SPEC))
        except FileNotFoundError:
            spec = None
        if isinstance(spec, dict):
            data, train = spec.get("data") or {}, spec.get("train") or {}
            out.update(dataset=_dataset(data), model=model_variant(spec.get("model")), pred_len=data.get("pred_len"),
                       seed=train.get("seed"))
        swept = read_json(job, SWEEP_FIELDS)
        if isinstance(swept, dict) and isinstance(swept.get("fields"), dict):
            out["fields"] = swept["fields"]
        results = read_json(job, RESULTS)
        if isinstance(results, dict) and isinstance(results.get("test"), dict):
            t = results["test"]
            out["test"] = {"mse": t.get("mse"), "mae": t.get("mae")}
            out["test_data_units"] = {"mse": t.get("mse_data_units"), "mae": t.get("mae_data_units")}
            if results.get("val_loss") is not None:
                out["best_val_loss"] = results["val_loss"]
        good = status.goodput if status is not None else None
        if isinstance(good, dict) and good.get("share") is not None:
            out["goodput"] = good["share"]
    except Exception as exc:  # noqa: BLE001 - one job's trouble never hides the others
        out["problem"] = first_line(exc)
    return out


def rows(root: Store) -> list[dict[str, Any]]:
    got = [row(root.child(name), name) for name in job_names(root)]
    return sorted(got, key=lambda r: (str(r["dataset"]), str(r["model"]), r["pred_len"] or 0, str(sorted(r["fields"].items())),
                                      r["seed"] if isinstance(r["seed"], int) else 0, r["name"]))


def _spread(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def by_horizon(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over the completed jobs of each dataset and horizon (the grid's fields
    other than the seed kept apart)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in table:
        if r["test"] and r["test"].get("mse") is not None:
            others = tuple(sorted((k, str(v)) for k, v in r["fields"].items() if k not in ("train.seed", "data.pred_len", "model.ablation")))
            groups[(r["dataset"], r["model"], r["pred_len"], others)].append(r)
    out = []
    for (dataset, model, pred_len, others), members in sorted(
            groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), kv[0][2] or 0, kv[0][3])):
        mse = [m["test"]["mse"] for m in members]
        mae = [m["test"]["mae"] for m in members]
        out.append({"dataset": dataset, "model": model, "pred_len": pred_len, "fields": dict(others), "jobs": len(members),
                    "mse": statistics.fmean(mse), "mse_spread": _spread(mse),
                    "mae": statistics.fmean(mae), "mae_spread": _spread(mae)})
    return out


def by_dataset(horizons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset (and fields other than horizon and seed): the average over its horizons."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for h in horizons:
        groups[(h["dataset"], h["model"], tuple(sorted(h["fields"].items())))].append(h)
    return [{"dataset": d, "model": m, "fields": dict(f), "horizons": [h["pred_len"] for h in hs],
             "mse": statistics.fmean(h["mse"] for h in hs), "mae": statistics.fmean(h["mae"] for h in hs)}
            for (d, m, f), hs in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), kv[0][2]))]


# ----------------------------------------------------------------------------- formats
def _num(v: Any, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _phase(r: dict) -> str:
    if r["phase"] in ("completed",) or not r.get("total_steps"):
        return r["phase"]
    return f"{r['phase']} {r['global_step']}/{r['total_steps']}"


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def _fields(f: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in f.items()) or "-"


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| job | dataset | model | horizon | seed | fields | phase | test MSE | test MAE | MSE (data units) | "
             "MAE (data units) | best val loss | goodput |",
             "| --- | --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in table:
        t, u = r["test"] or {}, r["test_data_units"] or {}
        lines.append(f"| {r['name']} | {r['dataset'] or '-'} | {r['model'] or '-'} | {r['pred_len'] or '-'} | "
                     f"{r['seed'] if r['seed'] is not None else '-'} | {_fields(r['fields'])} | {_phase(r)} | "
                     f"{_num(t.get('mse'))} | {_num(t.get('mae'))} | {_num(u.get('mse'))} | {_num(u.get('mae'))} | "
                     f"{_num(r['best_val_loss'], 6)} | {_share(r['goodput'])} |")
    horizons = by_horizon(table)
    if horizons:
        lines += ["", "Mean (and spread: sample standard deviation) over the completed jobs of each horizon:", "",
                  "| dataset | model | horizon | fields | jobs | test MSE | test MAE |",
                  "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
        for h in horizons:
            mse = _num(h["mse"]) + (f" ± {_num(h['mse_spread'])}" if h["mse_spread"] is not None else "")
            mae = _num(h["mae"]) + (f" ± {_num(h['mae_spread'])}" if h["mae_spread"] is not None else "")
            lines.append(f"| {h['dataset']} | {h['model']} | {h['pred_len']} | {_fields(h['fields'])} | {h['jobs']} | "
                         f"{mse} | {mae} |")
        lines += ["", "Average over horizons:", "", "| dataset | model | fields | horizons | test MSE | test MAE |",
                  "| --- | --- | --- | --- | ---: | ---: |"]
        for d in by_dataset(horizons):
            lines.append(f"| {d['dataset']} | {d['model']} | {_fields(d['fields'])} | "
                         f"{', '.join(str(h) for h in d['horizons'])} | "
                         f"{_num(d['mse'])} | {_num(d['mae'])} |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["name", "dataset", "model", "pred_len", "seed", "fields", "phase", "global_step", "total_steps", "test_mse",
               "test_mae", "test_mse_data_units", "test_mae_data_units", "best_val_loss", "goodput"]


def as_csv(table: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in table:
        t, u = r["test"] or {}, r["test_data_units"] or {}
        w.writerow([r["name"], r["dataset"], r["model"], r["pred_len"], r["seed"], _fields(r["fields"]) if r["fields"] else "",
                    r["phase"], r["global_step"], r["total_steps"], t.get("mse"), t.get("mae"), u.get("mse"),
                    u.get("mae"), r["best_val_loss"], r["goodput"]])
    return buf.getvalue()

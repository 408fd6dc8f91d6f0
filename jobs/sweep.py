"""A sweep: a base job and a grid of dotted job fields, expanded into ordinary jobs.

A sweep file (CONTRACT, "Being added")::

    name: etth1-table               # job names are derived from it, one per grid point
    base: ../jobs/tiny-cpu.yaml     # a job spec, relative to this file (or a mapping inline)
    grid:                           # dotted job fields -> the values to try (the product of all)
      data.pred_len: [96, 192, 336, 720]
      train.seed: [1, 2, 3]

A value that is a mapping, given for a section, sets those fields of it together (``data:
[{kind: ETTh1, path: ...}, {kind: ETTh2, path: ...}]``: a dataset is its kind and its file).

Invariants:
- Expansion is deterministic: the same file gives the same jobs with the same names in the same
  order (the grid's fields in file order, the last one varying fastest).
- A job's name is the sweep's name and its point (``etth1-table-pred_len96-seed1``): each
  field by its last part where that alone is unique in the grid, else by its whole path; a name
  that would collide with another point's or exceed the name limit ends in a hash of its point.
- A bad sweep is refused whole, each problem naming its field (``grid.data.pred_len``): an
  unknown field, an empty list, a value the job would refuse, a field the sweep decides itself
  (``name``). Nothing is expanded, so nothing can be written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timellm_job.jobs.spec import JobSpec, SpecError, safe_name
from timellm_job.jobs.spec_files import parse_spec, read_yaml

NAME_LIMIT = 128
DERIVED = ("name",)  # the sweep names its jobs


@dataclass(frozen=True)
class Point:
    """One grid point: an ordinary job."""

    name: str
    fields: dict[str, Any]  # the grid's dotted fields and their values at this point
    spec: JobSpec


@dataclass
class Sweep:
    name: str
    grid: dict[str, list[Any]]
    points: list[Point] = field(default_factory=list)


def _slug(value: Any) -> str:
    if isinstance(value, dict) and value:  # several fields set together: named by the first
        value = next(iter(value.values()))
    text = json.dumps(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9._]+", "_", text).strip("._") or "_"


def _labels(fields: list[str]) -> dict[str, str]:
    last = [f.rsplit(".", 1)[-1] for f in fields]
    return {f: (short if last.count(short) == 1 else f.replace(".", "_")) for f, short in zip(fields, last, strict=True)}


def _names(sweep_name: str, points: list[dict[str, Any]]) -> list[str]:
    labels = _labels(list(points[0])) if points and points[0] else {}
    names = [f"{sweep_name}-" + "-".join(f"{labels[f]}{_slug(v)}" for f, v in p.items()) if p else sweep_name
             for p in points]
    out = []
    for name, point in zip(names, points, strict=True):
        if names.count(name) > 1 or len(name) > NAME_LIMIT or not safe_name(name):
            digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:8]
            name = f"{name[:NAME_LIMIT - 9]}-{digest}"
        out.append(name)
    return out


def _set(raw: dict, dotted: str, value: Any) -> None:
    """Set a dotted field; a mapping set on a section sets those of its fields together."""
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError([f"grid.{dotted}: {part} is not a section"])
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        node[parts[-1]] = {**node[parts[-1]], **value}
    else:
        node[parts[-1]] = value


def parse_sweep(raw: Any, base_dir: Path, root: str | None = None) -> Sweep:
    """Validate a sweep mapping and expand it; raises SpecError naming each bad field."""
    if not isinstance(raw, dict):
        raise SpecError([f"the sweep must be a mapping (name, base, grid), not {type(raw).__name__}"])
    problems = [f"{k}: not a field of a sweep (name, base, grid)" for k in raw if k not in ("name", "base", "grid")]
    name, base, grid = raw.get("name"), raw.get("base"), raw.get("grid")
    if not safe_name(name):
        problems.append("name: letters, digits, '.', '_' and '-' (a folder name prefix) are needed")
    if isinstance(base, str):
        path = (base_dir / base).resolve() if not Path(base).is_absolute() else Path(base)
        try:
            base_raw, base_folder = read_yaml(path), path.parent
        except SpecError as err:
            problems += [f"base: {problem}" for problem in err.problems]
            base_raw, base_folder = None, base_dir
    elif isinstance(base, dict):
        base_raw, base_folder = base, base_dir
    else:
        problems.append("base: a job spec's path (relative to the sweep file) or a job spec mapping is needed")
        base_raw, base_folder = None, base_dir
    if not isinstance(grid, dict) or not grid:
        problems.append("grid: a mapping of dotted job fields to lists of values is needed")
        grid = {}
    for key, values in grid.items():
        if key in DERIVED or str(key).startswith("name."):
            problems.append(f"grid.{key}: the sweep names its jobs; it cannot be a grid field")
        elif not isinstance(values, list) or not values:
            problems.append(f"grid.{key}: a non-empty list of values is needed")
    if problems or not isinstance(base_raw, dict):
        raise SpecError(problems or ["base: the job spec must be a mapping of sections"])
    sweep = Sweep(name, {str(k): list(v) for k, v in grid.items()})
    points = [dict(zip(sweep.grid, combo, strict=True)) for combo in itertools.product(*sweep.grid.values())]
    for point, job_name in zip(points, _names(name, points), strict=True):
        job_raw = json.loads(json.dumps(base_raw, default=str))
        job_raw["name"] = job_name
        try:
            for dotted, value in point.items():
                _set(job_raw, dotted, value)
            spec = parse_spec(job_raw, base_folder, root=root)
        except SpecError as err:
            where = ", ".join(f"{k}={v!r}" for k, v in point.items())
            for problem in err.problems:
                dotted, _, why = problem.partition(": ")
                problems.append(f"grid.{dotted}: {point[dotted]!r}: {why}" if dotted in point
                                else f"grid point {where}: {problem}")
            continue
        sweep.points.append(Point(job_name, point, spec))
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))
    return sweep


def load_sweep(path: str | Path, root: str | None = None) -> Sweep:
    return parse_sweep(read_yaml(path), Path(path).resolve().parent, root)

"""A job spec as a file: YAML in (validated by jobs.spec's schema), YAML out.

Invariants:
- Every error is reported as ``section.field: message`` (:class:`SpecError`), never a traceback.
- Relative paths (``storage.root``, ``data.path``, a local ``backbone.pretrained``) are resolved
  against the folder of the spec file, unless they are URLs (``scheme://``); a ``--root`` given
  on the command line resolves against the current directory, as a shell user expects.
- ``--set section.field=value`` is applied before validation, as if the file said it.
- YAML aliases and anchors are refused (a few hundred bytes can expand to gigabytes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from timellm_job.jobs.spec import JobSpec, ModelSpec, SpecError


def _is_url(path: str) -> bool:
    return "://" in path


def _resolve(path: str, base: Path) -> str:
    if _is_url(path) or os.path.isabs(path):
        return path
    return str((base / path).resolve())


def _format_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and section)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if isinstance(e.get("ctx", {}).get("error"), SpecError):
            problems.extend(e["ctx"]["error"].problems)
            continue
        field, sep, rest = msg.partition(": ")
        if sep and field.isidentifier() and loc:  # a section's check that names its field: section.field
            loc, msg = f"{loc}.{field}", rest
        problems.append(f"{loc}: {msg}" if loc else msg)
    return problems


def _apply_set(raw: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise SpecError([f"--set {assignment}: expected section.key=value"])
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError([f"{key}: cannot set a field inside a {type(child).__name__}"])
        node = child
    node[parts[-1]] = parsed


def parse_spec(raw: Any, base_dir: Path, root: str | None = None, sets: tuple[str, ...] = ()) -> JobSpec:
    """Validate a spec mapping; ``root`` and ``sets`` override fields, paths resolve against base_dir."""
    if not isinstance(raw, dict):
        raise SpecError([f"the spec must be a mapping of sections, not {type(raw).__name__}"])
    raw = json.loads(json.dumps(raw, default=str))  # a private deep copy
    for assignment in sets:
        _apply_set(raw, assignment)
    if root is not None:
        root = root if _is_url(root) else os.path.abspath(os.path.expanduser(root))  # relative to the shell
        raw.setdefault("storage", {})
        if not isinstance(raw["storage"], dict):
            raise SpecError(["storage: must be a mapping"])
        raw["storage"]["root"] = root
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_error(err)) from None
    except SpecError:
        raise
    spec.storage.root = _resolve(spec.storage.root, base_dir)
    spec.data.path = _resolve(spec.data.path, base_dir)
    pre = spec.model.backbone.pretrained
    if pre is not None and (pre.startswith((".", "/", "~")) or (base_dir / pre).exists()):
        spec.model.backbone.pretrained = _resolve(os.path.expanduser(pre), base_dir)
        if not Path(spec.model.backbone.pretrained).is_dir():
            raise SpecError([f"model.backbone.pretrained: no such directory: {spec.model.backbone.pretrained}"])
    # re-run the cross-section checks that depend on resolved paths (a local backbone's depth)
    try:
        ModelSpec.model_validate(spec.model.model_dump())
    except ValidationError as err:
        raise SpecError([f"model.{p}" for p in _format_error(err)]) from None
    return spec


def read_yaml(path: str | Path) -> Any:
    """A YAML file (a job spec, a sweep) as data, without aliases; raises :class:`SpecError` in
    one line: no such file, cannot read, or not valid YAML with the line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{path}: cannot read: {exc}"]) from None
    try:
        return safe_load_no_aliases(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError([f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None


def load_spec(path: str | Path, root: str | None = None, sets: tuple[str, ...] = ()) -> JobSpec:
    """Read and validate a job.yaml; raises :class:`SpecError` naming each bad field."""
    return parse_spec(read_yaml(path), Path(path).resolve().parent, root=root, sets=sets)


class _NoAliasLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing aliases: a job spec never needs one, and a few hundred bytes of
    nested aliases expand into gigabytes (a 'billion laughs')."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in a job spec; "
                                              "write the value out", event.start_mark)
        return super().compose_node(parent, index)


def safe_load_no_aliases(text: str) -> Any:
    """``yaml.safe_load`` without aliases (see :class:`_NoAliasLoader`)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def spec_to_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)

"""What makes two specs the same job: the training sections, compared field by field, and the
spec hash recorded in every checkpoint manifest.

Invariants:
- The ``data``, ``model`` and ``train`` sections define the trained model; :func:`training_fields`
  gives them so a resumed job can be compared with the stored one. The memory plan's fields
  (``MEMORY_FIELDS``) say how a step is computed, not what is trained: they may change on resume.
- A job is identified by what it trains on: :func:`spec_hash` covers the data file's *content*
  (its sha256, computed by storage.data_digest) and not ``data.path``, so the same job with the
  same CSV elsewhere is the same job; a changed CSV is another. ``spec_hash(spec)`` without a
  digest is the hash earlier versions gave a job (over the path), still accepted on read.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from timellm_job.jobs.spec import JobSpec

TRAINING_SECTIONS = ("data", "model", "train")
# How a step is computed, not what is trained: the memory plan's fields may change between
# submits of one job (after an out-of-memory diagnosis, on another card) and are left out of
# the spec hash and of the comparison with the stored spec.
MEMORY_FIELDS = {"model": ("compute_dtype",), "train": ("micro_batch_size", "gradient_checkpointing")}
# Fields added after jobs existed, and the values that mean what a job meant before them: left
# out of the hash at those values, so an upgrade changes no job's identity.
NEW_DEFAULTS = (("train", "nproc", (1,)), ("train", "deterministic", ("auto", True)),
                ("model", "ablation", ("none",)))


def training_fields(spec: JobSpec) -> dict[str, Any]:
    """The sections that define the trained model; a resume must not change them.

    Fields added after jobs existed are left out while at their default (``train.nproc: 1``),
    so that upgrading timellm-job does not change the hash of a job started before."""
    return without_new_defaults({s: getattr(spec, s).model_dump(mode="json") for s in TRAINING_SECTIONS})


def without_new_defaults(fields: dict[str, Any]) -> dict[str, Any]:
    """Training sections (of a spec, or as stored by an earlier submit) without the fields that
    are at a default added after jobs existed, and without the memory plan's fields."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in fields.items()}
    for section, name, defaults in NEW_DEFAULTS:
        if isinstance(out.get(section), dict) and out[section].get(name, defaults[0]) in defaults:
            out[section].pop(name, None)
    for section, names in MEMORY_FIELDS.items():
        if isinstance(out.get(section), dict):
            for name in names:
                out[section].pop(name, None)
    return out


def spec_hash(spec: JobSpec, data_sha256: str | None = None) -> str:
    """A stable hash of the training sections, recorded in every checkpoint manifest.

    With ``data_sha256`` (the data file's content, storage.data_digest) the hash covers what the
    data is instead of where it lies: the job's identity. Without it, the hash earlier versions
    wrote (over ``data.path``): their checkpoints are still the job's (:func:`job_hashes`)."""
    fields = training_fields(spec)
    if data_sha256 is not None:
        fields["data"] = {**fields["data"], "path": None, "sha256": data_sha256}
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def job_hashes(spec: JobSpec, data_sha256: str | None) -> frozenset[str]:
    """Every spec hash the job's checkpoints may carry: by content (this version's, when the
    data could be read) and by path (earlier versions')."""
    return frozenset(h for h in (spec_hash(spec, data_sha256) if data_sha256 else None, spec_hash(spec)) if h)


def diff_fields(stored: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two nested mappings."""
    out = []
    for key in sorted(set(stored) | set(new)):
        a, b, name = stored.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff_fields(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: stored {a!r}, given {b!r}")
    return out

"""The checkpoint manifest: the commit record of one checkpoint folder.

Invariants:
- A manifest lists every data file of its checkpoint with size and sha256; it is written after
  all of them, so its presence means the files were complete when it was written.
- ``lease_generation`` then ``progress`` order checkpoints (newest = largest), ``created_at``
  breaks ties.
- The format version is checked on read: an unknown future version is not loaded (and, since
  what cannot be read is never deleted, not removed either: storage.retention).
- ``data_dir`` names the folder under the checkpoint's that holds its files ("" for the
  checkpoint's own folder): on object stores each writer writes under a prefix of its own, and
  the manifest says whose prefix was committed (format 2). It is one safe path component.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

FORMAT_VERSION = 2  # the newest this version reads; 1: files in the checkpoint's own folder
MANIFEST = "manifest.json"
_DATA_DIR = re.compile(r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,127})?$")
Kind = Literal["step", "best", "preempt", "imported", "backbone"]


class FileEntry(BaseModel):
    size: int = Field(ge=0)
    sha256: str = Field(min_length=64, max_length=64)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    format_version: int
    id: str
    step: int = Field(ge=0)
    kind: Kind
    created_at: float
    spec_hash: str
    progress: list[int]
    files: dict[str, FileEntry]
    metadata: dict[str, Any] = Field(default_factory=dict)
    lease_generation: int | None = None  # the lease generation its writer held (None: written unfenced)
    data_dir: str = ""  # the files' folder under the checkpoint's ("": the checkpoint's own)

    @field_validator("data_dir")
    @classmethod
    def _one_component(cls, v: str) -> str:
        if not _DATA_DIR.match(v):
            raise ValueError(f"data_dir {v!r} is not one safe folder name")
        return v

    def folder(self, base: str) -> str:
        """The checkpoint's folder under ``base``."""
        return f"{base}/{self.id}"

    def data_folder(self, base: str) -> str:
        """The folder that holds the checkpoint's files."""
        return f"{base}/{self.id}/{self.data_dir}" if self.data_dir else f"{base}/{self.id}"

    @property
    def val_loss(self) -> float | None:
        """A best checkpoint's validation loss (None when unknown)."""
        loss = self.metadata.get("val_loss", self.metadata.get("best_val"))
        try:
            return float(loss) if loss is not None else None
        except (TypeError, ValueError):
            return None

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def order(self) -> tuple:
        """Newest = largest: a later lease generation first (a writer fenced out by a newer holder
        never wins over that holder's checkpoints), then progress, then the time of commit."""
        return (self.lease_generation or 0, tuple(self.progress), self.created_at)

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True).encode()


class ManifestError(ValueError):
    """A manifest that cannot be parsed or is of an unknown format."""


def parse_manifest(data: bytes) -> Manifest:
    """The manifest in ``data``; ManifestError when it is not one this version can read (torn,
    written by hand, or by a newer timellm-job: the format is judged before the fields, whose
    kinds a newer format may extend)."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"unreadable manifest: {exc}") from None
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ManifestError(f"manifest format {version} is newer than this timellm-job understands "
                            f"({FORMAT_VERSION}): upgrade timellm-job")
    try:
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        raise ManifestError(f"unreadable manifest: {exc}") from None

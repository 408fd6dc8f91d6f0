"""The checkpoint manifest: the commit record of one checkpoint folder.

Invariants:
- A manifest lists every data file of its checkpoint with size and sha256; it is written after
  all of them, so its presence means the files were complete when it was written.
- ``lease_generation`` then ``progress`` order checkpoints (newest = largest), ``created_at``
  breaks ties.
- The format version is checked on read: an unknown future version is not loaded.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
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
    try:
        manifest = Manifest.model_validate(json.loads(data))
    except (ValueError, ValidationError) as exc:
        raise ManifestError(f"unreadable manifest: {exc}") from None
    if manifest.format_version > FORMAT_VERSION:
        raise ManifestError(f"manifest format {manifest.format_version} is newer than this "
                            f"timellm-job understands ({FORMAT_VERSION}): upgrade timellm-job")
    return manifest

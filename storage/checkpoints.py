"""Finding, verifying and loading committed checkpoints.

Invariants:
- One view of a job's checkpoints (:func:`list_checkpoints`) serves every reader: resume, the
  final test, export, status, retention and import. Only folders with a parseable manifest are
  checkpoints; the rest are reported as uncommitted. A manifest whose ``id`` is not its folder's
  name (a copied folder) and, given the job's spec hash, a checkpoint written for another spec
  are set apart: never loaded, exported, shown as the job's, or counted (or removed) by retention.
- ``load`` checks every file's size and sha256 against the manifest in the same pass that reads
  it, and returns bytes only when all match; otherwise it raises :class:`CorruptCheckpoint`
  naming the file.
- ``load_newest`` walks checkpoints newest first and returns the first that verifies, with the
  ids it skipped and why (a Drive upload that lags, a torn write, a flipped byte).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from timellm_job.storage.commit_strategy import TMP_PREFIX
from timellm_job.storage.layout import CHECKPOINTS
from timellm_job.storage.manifest import MANIFEST, Manifest, ManifestError, parse_manifest
from timellm_job.storage.store import Store


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files do not match its manifest."""

    def __init__(self, ckpt_id: str, problems: list[str]):
        self.ckpt_id, self.problems = ckpt_id, problems
        super().__init__(f"checkpoint {ckpt_id}: " + "; ".join(problems))


@dataclass
class Listing:
    committed: list[Manifest] = field(default_factory=list)  # the job's own, newest first
    uncommitted: list[str] = field(default_factory=list)  # folder names without a valid manifest
    unreadable: dict[str, str] = field(default_factory=dict)  # folder -> why its manifest is bad
    set_apart: dict[str, str] = field(default_factory=dict)  # folder -> why it is not the job's (kept)


SpecHashes = str | set[str] | frozenset[str] | tuple[str, ...] | None


def _hashes(spec_hash: SpecHashes) -> set[str] | None:
    return None if spec_hash is None else {spec_hash} if isinstance(spec_hash, str) else set(spec_hash)


def list_checkpoints(job: Store, base: str = CHECKPOINTS, spec_hash: SpecHashes = None) -> Listing:
    """The job's committed checkpoints under ``base`` (newest first; written for ``spec_hash``,
    or for any of several when given a set: a job's hash and the one an earlier version gave
    it), and the rest."""
    hashes = _hashes(spec_hash)
    listing = Listing()
    for name, kind, _ in job.list_dir(base):
        if kind != "directory":
            continue
        if name.startswith(TMP_PREFIX):
            listing.uncommitted.append(name)
            continue
        try:
            manifest = parse_manifest(job.read_bytes(f"{base}/{name}/{MANIFEST}"))
        except FileNotFoundError:
            listing.uncommitted.append(name)
            continue
        except ManifestError as exc:
            listing.unreadable[name] = str(exc)
            continue
        if manifest.id != name:
            listing.set_apart[name] = f"its manifest names checkpoint {manifest.id} (a copied folder)"
        elif hashes is not None and manifest.spec_hash not in hashes:
            listing.set_apart[name] = "written for another spec"
        else:
            listing.committed.append(manifest)
    listing.committed.sort(key=Manifest.order, reverse=True)
    return listing


def summaries(job: Store, base: str) -> list[dict]:
    """Key, size and time of each committed folder under ``base`` (e.g. the backbone caches)."""
    return [{"key": m.id, "bytes": m.bytes, "created_at": m.created_at}
            for m in list_checkpoints(job, base).committed]


def check_sizes(job: Store, manifest: Manifest, base: str = CHECKPOINTS) -> list[str]:
    """Cheap check: every listed file exists with its listed size."""
    folder = manifest.data_folder(base)
    present = {name: size for name, kind, size in job.list_dir(folder) if kind == "file"}
    problems = []
    for name, entry in manifest.files.items():
        if name not in present:
            problems.append(f"{name}: missing")
        elif present[name] != entry.size:
            problems.append(f"{name}: {present[name]} bytes, manifest says {entry.size}")
    return problems


def verify(job: Store, manifest: Manifest, hashes: bool = True, base: str = CHECKPOINTS) -> list[str]:
    """Problems found (empty when whole): sizes always, sha256 when ``hashes``."""
    problems = check_sizes(job, manifest, base)
    if problems or not hashes:
        return problems
    folder = manifest.data_folder(base)
    names = list(manifest.files)
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(names)))) as pool:  # files in parallel, as load
        digests = list(pool.map(lambda name: job.hash_file(f"{folder}/{name}")[1], names))
    for name, digest in zip(names, digests, strict=True):
        entry = manifest.files[name]
        if digest != entry.sha256:
            problems.append(f"{name}: sha256 {digest[:12]}… does not match the manifest's {entry.sha256[:12]}…")
    return problems


def load(job: Store, manifest: Manifest, names: list[str] | None = None,
         base: str = CHECKPOINTS) -> dict[str, bytes]:
    """Read the checkpoint's files, verified against the manifest in the same pass."""
    problems = check_sizes(job, manifest, base)
    if problems:
        raise CorruptCheckpoint(manifest.id, problems)
    folder = manifest.data_folder(base)

    def read(name: str) -> bytes:
        entry = manifest.files[name]
        try:
            data, digest = job.read_file(f"{folder}/{name}")
        except FileNotFoundError:
            raise CorruptCheckpoint(manifest.id, [f"{name}: missing"]) from None
        if len(data) != entry.size:
            raise CorruptCheckpoint(manifest.id, [f"{name}: read {len(data)} bytes, manifest says {entry.size}"])
        if digest != entry.sha256:
            raise CorruptCheckpoint(manifest.id, [f"{name}: sha256 does not match the manifest"])
        return data

    wanted = names or list(manifest.files)
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(wanted)))) as pool:  # files in parallel
        return dict(zip(wanted, pool.map(read, wanted), strict=True))


@dataclass
class Loaded:
    manifest: Manifest
    files: dict[str, bytes]
    skipped: list[str]  # "<id>: why" for each newer checkpoint that did not verify


def load_newest(job: Store, kinds: tuple[str, ...] | None = None, spec_hash: SpecHashes = None,
                skipped: list[str] | None = None, at_or_before: list[int] | None = None) -> Loaded | None:
    """The newest checkpoint (of ``kinds``, written for ``spec_hash``; with ``at_or_before``, at
    that training position or earlier) that verifies, or None.

    Every newer checkpoint passed over is appended to ``skipped`` (and to the result's), with why.
    """
    skipped = [] if skipped is None else skipped
    listing = list_checkpoints(job, spec_hash=spec_hash)
    skipped.extend(f"{name}: {why}" for name, why in sorted(listing.set_apart.items()))
    skipped.extend(f"{name}: {why}" for name, why in sorted(listing.unreadable.items()))
    for manifest in listing.committed:
        if kinds and manifest.kind not in kinds:
            continue
        if at_or_before is not None and list(manifest.progress) > list(at_or_before):
            continue
        try:
            return Loaded(manifest, load(job, manifest), skipped)
        except CorruptCheckpoint as exc:
            skipped.append(f"{manifest.id}: {'; '.join(exc.problems)}")
    return None

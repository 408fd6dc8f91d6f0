"""Cold restarts: the quantized backbone kept beside the job, so a new runtime starts in minutes.

The first build of a job's backbone (download + quantize, or a random build) is saved with its
tokenizer (transformers serializes bitsandbytes 4- and 8-bit models) and committed under
``<job>/backbone/<key>/`` with storage's commit protocol: files first, manifest last, sizes and
sha256. Every later start loads it instead of building again: first from a verified copy on the
machine's disk (``~/.cache/timellm-job/backbones``, or ``TIMELLM_JOB_BACKBONE_CACHE``), else from
the job's storage (then copied to the machine's disk, from the bytes that verified, without
fsync: the copy is verified before every use, a torn one is fetched again). The model
is saved in shards of at most 1 GB, so reads, copies and their sha256 run on several cores.
The trainer starts that fetch (:func:`prefetch`) before its imports and data, which it overlaps.

Invariants:
- The key covers the backbone (id or path, revision, or the random spec), ``llm_layers``, the
  quantization, the compute dtype (when not the device's old default), the device type and the torch / transformers / bitsandbytes versions: a cache
  built for anything else is never used.
- A cache is used only after its files verify against its manifest; a corrupt or partial one
  is reported, removed and rebuilt.
- ``source`` says where the backbone came from: ``built``, ``local-cache:<dir>`` or
  ``job-cache:<url>``; the trainer reports it in its heartbeat, the attempt records it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from timellm_job.storage import CorruptCheckpoint, Store, commit_checkpoint, load, open_store
from timellm_job.storage.checkpoints import list_checkpoints, summaries, verify
from timellm_job.storage.layout import BACKBONE
from timellm_job.storage.retention import delete_checkpoint
from timellm_job.trainer.backbone import Backbone, compute_dtype_of, finish, load_backbone

FORMAT = 2  # 2: random LLaMA tokenizers add BOS (a cache of format 1 holds one that does not)
SHARD = "1GB"  # safetensors shards: verifying and copying hash (up to 4) files in parallel

log = logging.getLogger(__name__)


def _version(package: str) -> str:
    try:
        return metadata.version(package)  # without importing it (bitsandbytes takes seconds)
    except metadata.PackageNotFoundError:
        return "absent"


def cache_key(model_spec, device: str) -> str:
    versions = {"torch": torch.__version__.split("+")[0], "transformers": _version("transformers")}
    if model_spec.quantization != "none":
        versions["bitsandbytes"] = _version("bitsandbytes")
    doc = {"format": FORMAT, "backbone": model_spec.backbone.model_dump(mode="json"),
           "llm_layers": model_spec.llm_layers, "quantization": model_spec.quantization,
           "device": torch.device(device).type, "versions": versions}
    dtype = compute_dtype_of(model_spec, device)
    if dtype != (torch.bfloat16 if device.startswith("cuda") else torch.float32):  # keys made before it stay
        doc["compute_dtype"] = str(dtype)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def local_root() -> Path:
    return Path(os.environ.get("TIMELLM_JOB_BACKBONE_CACHE")
                or Path.home() / ".cache" / "timellm-job" / "backbones")


def _say(msg: str) -> None:
    log.info("%s", msg)


def _read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _load_from_folder(folder: str, model_spec, device: str, source: str) -> Backbone:
    from transformers import AutoModel, AutoTokenizer

    dtype = compute_dtype_of(model_spec, device)
    kwargs = {"device_map": device} if model_spec.quantization != "none" else {}
    model = AutoModel.from_pretrained(folder, dtype=dtype, **kwargs)
    if model_spec.quantization == "none":
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    layers = getattr(model.config, "num_hidden_layers", None) or model.config.n_layer
    return finish(model, tokenizer, model_spec, layers, source)


def _manifest(store: Store, key: str):
    return next((m for m in list_checkpoints(store, BACKBONE).committed if m.id == key), None)


def _discard(store: Store, key: str, problems: list[str]) -> None:
    _say(f"backbone cache {store.url_of(f'{BACKBONE}/{key}')} does not verify ({'; '.join(problems)}): "
         "removing it and building again")
    delete_checkpoint(store, key, base=BACKBONE)


def _whole(store: Store, key: str) -> bool:
    """The cache is committed and whole (hashed as it streams: nothing kept); a corrupt one is
    removed (and False)."""
    manifest = _manifest(store, key)
    if manifest is None:
        return False
    problems = verify(store, manifest, base=BACKBONE)
    if problems:
        _discard(store, key, problems)
    return not problems


def _verified(store: Store, key: str) -> dict[str, bytes] | None:
    """The cache's files when committed and whole; a corrupt one is removed (and None)."""
    manifest = _manifest(store, key)
    if manifest is None:
        return None
    try:
        return load(store, manifest, base=BACKBONE)
    except CorruptCheckpoint as err:
        _discard(store, key, err.problems)
        return None


def _commit(store: Store, key: str, files: dict[str, bytes], durable: bool = True) -> bool:
    """Commit ``files`` as the cache ``key``: True when this call wrote them."""
    try:
        commit_checkpoint(store, 0, "backbone", files, key, ckpt_id=key, base=BACKBONE, durable=durable)
        return True
    except FileExistsError:
        return False  # committed meanwhile: the same bytes by construction of the key


@dataclass
class Fetched:
    folder: Path  # a verified copy on this machine's disk
    source: str  # local-cache:<dir> or job-cache:<url>


def fetch(model_spec, device: str, job: Store) -> Fetched | None:
    """The nearest verified cache as a folder on this machine's disk (copied there from the job's
    storage when only the job has it), or None. Storage and sha256 only, no transformers: it
    runs on a thread while the trainer imports and reads its data (reads and sha256 release the
    GIL)."""
    key = cache_key(model_spec, device)
    folder = local_root() / BACKBONE / key
    local = open_store(str(local_root()))
    if _whole(local, key):
        return Fetched(folder, f"local-cache:{folder}")
    files = _verified(job, key)
    if files is not None:
        # the local copy is written from bytes that verified: it needs no second check, unless
        # another process committed it meanwhile
        written = _commit(local, key, files, durable=False)
        del files
        if written or _whole(local, key):
            return Fetched(folder, f"job-cache:{job.url_of(f'{BACKBONE}/{key}')}")
    return None


def prefetch(model_spec, device: str, job: Store) -> Future:
    """:func:`fetch` started on a daemon thread (a trainer failing meanwhile does not wait on it)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fetch(model_spec, device, job))
        except BaseException as exc:  # raised again where the result is asked for
            future.set_exception(exc)

    threading.Thread(target=run, name="backbone-prefetch", daemon=True).start()
    return future


def load_cached(model_spec, device: str, job: Store, prefetched: Future | None = None) -> Backbone:
    """The backbone from the nearest verified cache, or built (and then cached)."""
    import transformers  # noqa: F401  (seconds of imports, needed either way, while the prefetch reads)

    if model_spec.quantization != "none":
        import bitsandbytes  # noqa: F401
    found = prefetched.result() if prefetched is not None else None
    if found is None:  # (again after a prefetch: another process may have cached it since)
        found = fetch(model_spec, device, job)
    if found is not None:
        return _load_from_folder(str(found.folder), model_spec, device, found.source)
    key = cache_key(model_spec, device)
    local = open_store(str(local_root()))
    backbone = load_backbone(model_spec, device)
    try:
        with tempfile.TemporaryDirectory(prefix="backbone-") as folder:
            backbone.model.save_pretrained(folder, max_shard_size=SHARD)
            backbone.tokenizer.save_pretrained(folder)
            files = _read_folder(Path(folder))
        _commit(job, key, files)
        _commit(local, key, files, durable=False)
        _say(f"backbone cached as {job.url_of(f'{BACKBONE}/{key}')} ({sum(map(len, files.values())) / 1e6:.1f} MB)")
    except (OSError, ValueError, NotImplementedError) as exc:  # a model transformers cannot serialize
        _say(f"warning: the backbone could not be cached ({exc}); later starts will build it again")
        backbone.source = "built"
        return backbone
    # every start loads the same serialized bytes the same way, the first one included, so a
    # resumed attempt computes exactly what the first one did
    del backbone, files
    return _load_from_folder(str(local_root() / BACKBONE / key), model_spec, device, "built")


def cache_info(job: Store) -> list[dict]:
    """Each committed backbone cache of the job with its size (``status`` shows the same)."""
    return summaries(job, BACKBONE)

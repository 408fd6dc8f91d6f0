"""Where bytes live: fsspec stores, the checkpoint commit protocol, manifests, retention,
retries and the job's lease. Every byte the project writes goes through this package."""

from timellm_job.storage.checkpoints import (
           CorruptCheckpoint,
           Loaded,
           list_checkpoints,
           load,
           load_newest,
           verify,
)
from timellm_job.storage.commit import AlreadyCommitted, commit_checkpoint
from timellm_job.storage.layout import job_store
from timellm_job.storage.manifest import Manifest
from timellm_job.storage.retry import StorageError
from timellm_job.storage.store import Store, Unreachable, open_store

__all__ = ["AlreadyCommitted", "CorruptCheckpoint", "Loaded", "Manifest", "StorageError", "Store",
           "Unreachable", "commit_checkpoint", "job_store", "list_checkpoints", "load", "load_newest",
           "open_store", "verify"]

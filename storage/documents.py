"""Small JSON documents (state, lease, heartbeat, results) replaced atomically.

Invariants: a reader sees the old document or the new one, never a mix (see Store.replace);
a missing document reads as None; an unparseable one raises ValueError naming its URL.
"""

from __future__ import annotations

import json
from typing import Any

from timellm_job.storage.store import Store


def read_json(store: Store, rel: str) -> Any | None:
    try:
        data = store.read_bytes(rel)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{store.url_of(rel)}: not valid JSON: {exc}") from None


def write_json(store: Store, rel: str, doc: Any, durable: bool = True) -> None:
    store.replace(rel, json.dumps(doc, indent=1, sort_keys=True, default=str).encode(), durable=durable)

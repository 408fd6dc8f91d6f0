"""What of a job's spec may be stored, shown or logged: secrets redacted.

Invariants:
- ``storage.options`` keep a value only under a key known to be harmless; everything else, at
  any depth, is ``<redacted>``.
- A URL keeps no user-info and no query (where signed URLs carry their signatures); a URL that
  is itself a secret (a webhook, a healthcheck's ping URL) keeps its scheme and host only.
- The stored spec (``redacted_yaml``) is what ``submit`` writes as the job's ``job.yaml``.
"""

from __future__ import annotations

import re

import yaml

from timellm_job.jobs import JobSpec

# storage.options whose values are harmless to keep in the stored spec (everything else is
# redacted, at any depth): where the store is, never who may use it
HARMLESS_OPTIONS = {"project", "region", "region_name", "endpoint_url", "endpoint", "location",
                    "default_location", "use_ssl", "requester_pays", "version_aware", "anon",
                    "consistency", "cache_timeout", "listings_expiry_time", "auto_mkdir", "target_protocol",
                    "client_kwargs", "config_kwargs", "s3_additional_kwargs", "default_block_size",
                    "fixed_upload_size", "addressing_style", "signature_version", "timeout", "retries"}
TOKEN_METHODS = {"anon", "google_default", "cache", "cloud", "browser"}  # gcsfs: how, not what
_URL = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^@/?#]*@)?(?P<rest>[^?#]*)(?P<query>\?[^#]*)?(?P<frag>#.*)?$")


def redacted_url(value: str) -> str:
    """A URL without its user-info (``user:password@``) and its query (where signed URLs and
    SAS tokens carry their signatures); any other string as it is."""
    m = _URL.match(value) if isinstance(value, str) else None
    if not m or not (m.group("userinfo") or m.group("query")):
        return value
    return f"{m.group('scheme')}{'<redacted>@' if m.group('userinfo') else ''}{m.group('rest')}" \
           f"{'?<redacted>' if m.group('query') else ''}"


def redacted_secret_url(value: str) -> str:
    """A URL that is itself a secret (a webhook, a healthcheck's ping URL): its scheme and host
    only."""
    m = re.match(r"^(?P<base>[a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^@/?#]*@)?(?P<host>[^/?#]*)", value or "")
    return f"{m.group('base')}{m.group('host')}/<redacted>" if m else "<redacted>"


def redacted(value, key: str = ""):
    """``storage.options`` as the stored spec keeps them: a value survives only under a key
    known to be harmless (``HARMLESS_OPTIONS``; ``token`` only when it names a method such as
    ``anon``), URLs lose their user-info and signatures, and everything else is redacted."""
    if isinstance(value, dict):
        return {k: redacted(v, str(k)) if str(k) in HARMLESS_OPTIONS or str(k) == "token" else "<redacted>"
                for k, v in value.items()} if not key or key in HARMLESS_OPTIONS else "<redacted>"
    if key == "token":
        return value if isinstance(value, str) and value in TOKEN_METHODS else "<redacted>"
    if isinstance(value, list):
        return [redacted(v, key) for v in value] if key in HARMLESS_OPTIONS else "<redacted>"
    if isinstance(value, str):
        return redacted_url(value)
    return value


def redacted_yaml(spec: JobSpec) -> str:
    doc = spec.model_dump(mode="json")
    doc["storage"]["options"] = redacted(doc["storage"]["options"])
    doc["storage"]["root"] = redacted_url(doc["storage"]["root"])
    doc["data"]["path"] = redacted_url(doc["data"]["path"])
    doc["run"]["notify"] = [redacted_secret_url(u) for u in doc["run"].get("notify") or []]
    if doc["run"].get("healthcheck_url"):
        doc["run"]["healthcheck_url"] = redacted_secret_url(doc["run"]["healthcheck_url"])
    notice = doc["run"].get("preemption_notice")
    if notice and notice.get("url"):
        notice["url"] = redacted_url(notice["url"])
    return yaml.safe_dump(doc, sort_keys=False)

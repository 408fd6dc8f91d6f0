"""Opt-in preemption notices: poll a cloud's metadata endpoint and react before the VM's signal.

Each provider speaks its metadata service's documented protocol:
- ``gce``: ``GET computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google``;
  ``TRUE`` once the VM is being preempted (about 30 s ahead).
- ``aws``: IMDSv2 (the default, often the only one, on current AMIs): a session token from
  ``PUT /latest/api/token`` (``X-aws-ec2-metadata-token-ttl-seconds``), then
  ``GET /latest/meta-data/spot/instance-action`` with ``X-aws-ec2-metadata-token``: 404 until a
  spot interruption is scheduled, then 200 with ``{"action": ..., "time": ...}`` (two minutes
  ahead). A 401 means the token expired: a new one is fetched.
- ``azure``: Scheduled Events, ``GET /metadata/scheduledevents?api-version=2020-07-01`` with
  ``Metadata: true``: a document whose ``Events`` holds one of ``EventType`` ``Preempt`` when a
  spot VM is to be evicted (at least 30 s ahead).

The URL is configurable (``run.preemption_notice.url``); tests point it at fake servers on
127.0.0.1 that behave like the real ones. A poll that fails is retried at the next interval; a
watcher that has failed ``FAILING_AFTER`` times in a row says so once (``on_trouble``: the log
and the job's status), and again only after it has worked in between.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

DEFAULT_URLS = {
    "gce": "http://metadata.google.internal/computeMetadata/v1/instance/preempted",
    "aws": "http://169.254.169.254/latest/meta-data/spot/instance-action",
    "azure": "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01",
}
TIMEOUT_S = 2.0
AWS_TOKEN_TTL_S = 21600
FAILING_AFTER = 3


class MetadataError(RuntimeError):
    """The metadata service did not answer as documented."""


def _get(url: str, headers: dict[str, str], method: str = "GET") -> tuple[int, str]:
    """(status, body); a 4xx/5xx answer is a status, not an exception."""
    req = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, ""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MetadataError(f"{url}: {getattr(exc, 'reason', exc)}") from None


def _document(url: str, body: str) -> dict:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise MetadataError(f"{url} answered an unreadable document")
    return doc


class GceProbe:
    def __init__(self, url: str):
        self.url = url

    def __call__(self) -> bool:
        status, body = _get(self.url, {"Metadata-Flavor": "Google"})
        if status != 200:
            raise MetadataError(f"{self.url} answered {status}")
        return body.strip().upper() == "TRUE"


class AwsProbe:
    """IMDSv2: a session token first, sent with every request; refreshed when refused."""

    def __init__(self, url: str):
        self.url = url
        parts = urllib.parse.urlsplit(url)
        self.token_url = f"{parts.scheme}://{parts.netloc}/latest/api/token"
        self.token: str | None = None

    def _fresh_token(self) -> str:
        status, body = _get(self.token_url, {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)}, "PUT")
        if status != 200 or not body.strip():
            raise MetadataError(f"{self.token_url} gave no IMDSv2 token (answered {status})")
        return body.strip()

    def __call__(self) -> bool:
        for _ in range(2):
            self.token = self.token or self._fresh_token()
            status, body = _get(self.url, {"X-aws-ec2-metadata-token": self.token})
            if status == 401:  # the token expired
                self.token = None
                continue
            if status == 404:
                return False  # nothing scheduled
            if status != 200:
                raise MetadataError(f"{self.url} answered {status}")
            return bool(_document(self.url, body).get("action"))
        raise MetadataError(f"{self.url} refused a fresh IMDSv2 token")


class AzureProbe:
    def __init__(self, url: str):
        self.url = url

    def __call__(self) -> bool:
        status, body = _get(self.url, {"Metadata": "true"})
        if status != 200:
            raise MetadataError(f"{self.url} answered {status}")
        events = _document(self.url, body).get("Events") or []
        return any(e.get("EventType") == "Preempt" for e in events if isinstance(e, dict))


PROBES = {"gce": GceProbe, "aws": AwsProbe, "azure": AzureProbe}


class NoticeWatcher:
    def __init__(self, provider: str, url: str | None, interval_s: float, on_notice: Callable[[str], None],
                 on_trouble: Callable[[str | None], None] | None = None):
        self.provider, self.url = provider, url or DEFAULT_URLS[provider]
        self.probe = PROBES[provider](self.url)
        self.interval_s, self.on_notice, self.on_trouble = interval_s, on_notice, on_trouble
        self.stopped = threading.Event()
        self.failures = 0

    def poll(self) -> bool:
        """One look at the metadata: True once a preemption is announced."""
        try:
            noticed = self.probe()
        except MetadataError as exc:
            self.failures += 1
            if self.failures == FAILING_AFTER and self.on_trouble:
                self.on_trouble(f"the {self.provider} preemption-notice watcher has failed {self.failures} times "
                                f"in a row ({exc}); no notice will be seen until it answers")
            return False
        if self.failures >= FAILING_AFTER and self.on_trouble:
            self.on_trouble(None)  # it answers again
        self.failures = 0
        return noticed

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            if self.poll():
                self.on_notice(f"{self.provider} metadata at {self.url} announced a preemption")
                return

    def start(self) -> NoticeWatcher:
        threading.Thread(target=self._run, name="preemption-notice", daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopped.set()

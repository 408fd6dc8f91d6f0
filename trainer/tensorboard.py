"""TensorBoard event files of a job, written through storage under ``<job>/tb/``, so that
``tensorboard --logdir <root>/<name>/tb`` shows a job while it trains on another machine.

Invariants:
- Written only through storage, and never appended to (object stores cannot append): each flush
  writes one new whole file, ``events.out.tfevents.<time>.a<attempt>.<seq>``, holding the events
  since the previous flush. TensorBoard reads a run's event files in name order; the names sort
  by time, then attempt, then sequence, so every event is read once and in order.
- Scalars: ``train/loss``, ``train/lr`` per optimizer step; ``val/mse``, ``val/mae`` per
  validated epoch; ``test/mse``, ``test/mae`` at the end. Text: ``attempts`` (an attempt's start,
  with the step it resumed at), so restarts show on TensorBoard's text tab.
- Needs the ``tensorboard`` extra (its protobuf classes and record checksum); without it nothing
  is written (``available()`` says so) and training is unaffected.
- Records follow TensorFlow's TFRecord framing: length, masked CRC-32C of the length, the
  serialized ``Event``, masked CRC-32C of it.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from timellm_job.storage.layout import TENSORBOARD as TB
from timellm_job.storage.store import Store

SCALARS = {"loss": "train/loss", "lr": "train/lr", "val_loss": "val/mse", "val_mae": "val/mae",
           "test_mse": "test/mse", "test_mae": "test/mae"}


def available() -> bool:
    try:
        from tensorboard.compat.proto import event_pb2  # noqa: F401
    except ImportError:
        return False
    return True


def _record(data: bytes) -> bytes:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class TensorBoardLog:
    def __init__(self, job: Store, attempt: int, enabled: bool = True):
        """``enabled=False`` (a rank other than 0) or no tensorboard installed: nothing is written."""
        self.job, self.attempt = job, attempt
        self.enabled = enabled and available()
        self.events: list[bytes] = []
        self.seq = 0

    def _event(self, step: int, wall_time: float, summary) -> None:
        from tensorboard.compat.proto import event_pb2

        self.events.append(_record(event_pb2.Event(wall_time=wall_time, step=step, summary=summary)
                                   .SerializeToString()))

    def add(self, record: dict[str, Any]) -> None:
        """A metrics record (trainer.reporting's): its known scalars become TensorBoard scalars."""
        if not self.enabled:
            return
        from tensorboard.compat.proto import summary_pb2

        values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(record[key]))
                  for key, tag in SCALARS.items() if record.get(key) is not None]
        if values:
            self._event(int(record.get("step", 0)), float(record.get("time", time.time())),
                        summary_pb2.Summary(value=values))

    def text(self, tag: str, text: str, step: int) -> None:
        if not self.enabled:
            return
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._event(step, time.time(), text_pb(tag, text))

    def flush(self) -> None:
        """Write the events since the last flush as one new event file."""
        if not self.enabled or not self.events:
            return
        from tensorboard.compat.proto import event_pb2

        now = time.time()
        head = _record(event_pb2.Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
        name = (f"{TB}/events.out.tfevents.{int(now):010d}.a{self.attempt:03d}.{self.seq:05d}."
                f"{socket.gethostname()}")
        self.job.replace(name, b"".join([head, *self.events]))
        self.events, self.seq = [], self.seq + 1

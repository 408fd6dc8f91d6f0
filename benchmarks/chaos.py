"""Chaos: one job on the GCS emulator, behind a proxy that answers 503 or drops the connection for
a share of requests, through random SIGKILLs of the trainer (many inside a checkpoint write),
kills of the whole process group with a resubmit, SIGTERMs, SIGSTOP hangs, flipped bytes in
the newest checkpoint, a second ``submit`` started while the job's runtime is alive (it must
exit 3 and write nothing), and a runtime whose storage path stalls until its lease expires (a
second runtime on a healthy path takes the job over; when the stalled path flows again the old
runtime must find itself fenced, exit 3 and never be resumed from). It must end bit-identical to
an uninterrupted run, and no attempt may resume from a checkpoint whose bytes were corrupted.

Each runtime reaches the store through its own proxy (STORAGE_EMULATOR_HOST), so one runtime's
path can stall while another's flows.

    python -m benchmarks.chaos [--events 120] [--seed 1] [--epochs 24]     # the long run

tests/test_chaos.py runs the same engine with a CI-sized plan. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.common import with_faults
from tests import servers
from tests.cli import heartbeat
from tests.faulty_proxy import FaultyProxy
from tests.jobfiles import final_state_of as final_state
from tests.jobfiles import quick_spec
from timellm_job.storage import job_store, list_checkpoints
from timellm_job.storage import lease as leases
from timellm_job.storage.documents import read_json
from timellm_job.storage.set_apart import list_set_apart

REPO = Path(__file__).resolve().parents[1]

KINDS = ("kill", "group", "sigterm", "sigstop", "corrupt", "second", "stall")
SAVE_STEPS = 5
HEARTBEAT_TIMEOUT_S = 8


def random_plan(events: int, seed: int) -> list[str]:
    """Mostly trainer kills; group kills, SIGTERMs, hangs, corruptions, second submits and
    stalled runtimes among them."""
    rng = random.Random(seed)
    return rng.choices(KINDS, weights=(64, 9, 7, 5, 5, 5, 5), k=events)


@dataclass
class Chaos:
    folder: Path
    epochs: int
    step_delay: float = 0.08
    write_delay: float = 0.05
    fault_every: int = 20  # gcsfs backs off 1-2 s on each fault it retries itself
    seed: int = 1
    log: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.gcs = servers.start_gcs()
        self.proxies: list[FaultyProxy] = []
        self.proxy = self.new_proxy()  # the current runtime's path to the store
        self.root = f"gs://{servers.GCS_BUCKET}/chaos-{time.time_ns()}"
        faulty = {"token": "anon"}  # the endpoint: each runtime's own proxy, from its environment
        self.spec = quick_spec(self.folder, name="chaos", storage={"root": self.root, "options": faulty,
                                                                   "save_steps": SAVE_STEPS},
                               train={"epochs": self.epochs, "patience": 1000},
                               run={"max_restarts": 10_000, "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
                                    "backoff_max_s": 2.0, "crash_loop_limit": 5})
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # else gcsfs waits 60 s per call here
        self.store = job_store(self.root, "chaos", servers.gcs_options(self.gcs))  # observer: no faults
        self.env = with_faults({**os.environ, **servers.gcs_env(self.gcs), "PYTHONUNBUFFERED": "1",
                    "TIMELLM_JOB_WORKDIR": str(self.folder / "work"), "TIMELLM_JOB_LEASE_TTL_S": "6",
                    "TIMELLM_JOB_BACKBONE_CACHE": str(self.folder / "backbones"),
                    "TIMELLM_JOB_HEARTBEAT_INTERVAL_S": "0",
                    "TIMELLM_JOB_SPARE_AFTER_S": "0",  # a warm spare behind every attempt: restarts claim them
                    "TIMELLM_JOB_TEST_STEP_DELAY_S": str(self.step_delay),
                    "TIMELLM_JOB_TEST_WRITE_DELAY_S": str(self.write_delay)})
        self.submit: subprocess.Popen | None = None
        self.submits = 0
        self.corrupted: dict[str, float] = {}  # checkpoint id -> when its bytes were flipped
        self.torn_seen: set[str] = set()
        self.last_reached = -1
        self.stalled: list[dict] = []  # the stall events' records

    # ------------------------------------------------------------------ processes
    def new_proxy(self) -> FaultyProxy:
        proxy = FaultyProxy(self.gcs.url, every=self.fault_every, mode="mixed")
        self.proxies.append(proxy)
        return proxy

    def launch(self) -> tuple[subprocess.Popen, Path]:
        """A ``submit`` of the job through the current proxy, and its log file."""
        self.submits += 1
        path = self.folder / f"submit-{self.submits:03d}.log"
        with open(path, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "timellm_job.orchestrator.cli", "submit", str(self.spec)],
                                    cwd=REPO, env={**self.env, "STORAGE_EMULATOR_HOST": self.proxy.url},
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return proc, path

    def start_submit(self) -> None:
        self.submit, _ = self.launch()

    def state(self) -> dict:
        try:
            return read_json(self.store, "state.json") or {}
        except Exception:  # noqa: BLE001 - a half-written document is read again next time
            return {}

    def heartbeat(self, attempt: int) -> dict:
        return heartbeat(self.folder / "work", attempt)

    @staticmethod
    def reported_resume(attempt: dict, beat: dict) -> dict:
        """The checkpoint the attempt resumed from and the ones it skipped: from its trainer's
        heartbeat ``beat``, else (no heartbeat file) from its record in state.json."""
        if "start_step" in beat:
            return {"resumed_from": beat.get("resumed_from"), "skipped": beat.get("skipped") or []}
        return {"resumed_from": attempt.get("resumed_from"), "skipped": attempt.get("skipped_checkpoints") or []}

    def running_attempt(self, after: int, timeout: float = 180) -> dict | None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.submit.poll() is not None:
                return None
            attempts = self.state().get("attempts") or []
            if attempts and attempts[-1]["number"] > after and attempts[-1].get("ended_at") is None \
                    and psutil.pid_exists(attempts[-1]["pid"]):
                return attempts[-1]
            time.sleep(0.1)
        raise TimeoutError("no running trainer")

    def wait_progress(self, attempt: int, steps: int, past: int = -1, timeout: float = 300) -> bool:
        """Until the attempt has taken ``steps`` steps and is beyond step ``past``."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.submit.poll() is None:
            beat = self.heartbeat(attempt)
            if "start_step" in beat and beat.get("step", 0) >= max(beat["start_step"] + steps, past + 1):
                return True
            time.sleep(0.05)
        return False

    def wait_gone(self, pid: int, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            if time.time() > deadline:
                raise AssertionError(f"process {pid} outlived its orchestrator")
            time.sleep(0.05)

    def kill_group(self, pid: int) -> None:
        os.killpg(self.submit.pid, signal.SIGKILL)
        self.submit.wait()
        self.wait_gone(pid)

    # ------------------------------------------------------------------ events
    def torn_now(self) -> set[str]:
        return set(list_checkpoints(self.store).uncommitted)

    def flip_newest(self) -> str | None:
        """Flip a byte of the newest checkpoint's model file (never the best's: the job keeps
        one best, and a job whose only best is corrupt cannot finish)."""
        committed = list_checkpoints(self.store).committed
        if not committed or committed[0].kind == "best":
            return None
        target = committed[0]
        path = f"{target.data_folder('checkpoints')}/model.safetensors"  # its writer's prefix on object stores
        data = bytearray(self.store.read_bytes(path))
        data[len(data) // 2] ^= 0xFF
        self.store.replace(path, bytes(data))  # a flipped byte in place: the manifest no longer matches
        self.corrupted[target.id] = time.time()
        return target.id

    def event(self, kind: str) -> bool:
        """Run one event; False when the job ended first."""
        last = len(self.state().get("attempts") or [])
        attempt = self.running_attempt(after=last - 1)
        # past the step of the previous event: kills that always land where training waits (on a
        # slow write) would be the same failure at the same step, which the supervisor rightly
        # calls a crash loop; random kills over the whole run are what this measures
        if attempt is None or not self.wait_progress(attempt["number"], 2, past=self.last_reached):
            return False
        time.sleep(self.rng.uniform(0.0, 1.0))
        if self.submit.poll() is not None:
            return False
        pid, record = attempt["pid"], {"kind": kind, "attempt": attempt["number"], "time": time.time()}
        self.last_reached = self.heartbeat(attempt["number"]).get("step", self.last_reached)
        if kind == "kill":
            os.kill(pid, signal.SIGKILL)
            torn = self.torn_now()
            record["mid_write"] = bool(torn - self.torn_seen)
            self.torn_seen = torn
        elif kind == "sigstop":
            os.kill(pid, signal.SIGSTOP)
        elif kind == "sigterm":
            self.submit.send_signal(signal.SIGTERM)
            record["exit"] = self.submit.wait(timeout=60)
            self.start_submit()
        elif kind == "second":
            self.second_submit(record)
            self.log.append(record)
            return True  # the job's runtime goes on: no new attempt to wait for
        elif kind == "stall":
            self.stall(record, pid)
            self.log.append(record)
            return True  # the new runtime's attempt is running already
        else:  # group, corrupt: everything dies at once, then a new submit
            if kind == "corrupt":  # the newest must be a checkpoint to resume from, not the best
                deadline = time.time() + 60
                while time.time() < deadline and self.submit.poll() is None:
                    committed = list_checkpoints(self.store).committed
                    if committed and committed[0].kind != "best":
                        break
                    time.sleep(0.05)
            self.kill_group(pid)
            if kind == "corrupt":
                record["corrupted"] = self.flip_newest()
            self.start_submit()
        self.log.append(record)
        self.running_attempt(after=attempt["number"])  # the next attempt is running (or the job ended)
        return True

    def second_submit(self, record: dict) -> None:
        """A second runtime submits the job while its runtime is alive: exit 3, nothing written."""
        def lease() -> tuple:
            return leases.generations(self.store), (self.state().get("lease") or {}).get("generation")

        before = lease()
        other, log = self.launch()
        record["exit"] = other.wait(timeout=600)
        record["said_held"] = "held by orchestrator" in log.read_text()
        record["lease_untouched"] = lease() == before
        record["first_alive"] = self.submit.poll() is None

    def stall(self, record: dict, trainer_pid: int) -> None:
        """The runtime's path to the store stalls (requests held unanswered) until its lease has
        expired; a new runtime on a healthy path takes the job; then the stalled path flows
        again and the old runtime must find itself fenced: exit 3, its trainer stopped."""
        old_submit, old_proxy = self.submit, self.proxy
        held = leases.read(self.store)
        old_proxy.stall()
        deadline = time.time() + 300
        # the new runtime judges the lease itself: it takes the job once the stalled runtime's
        # lease document stayed unchanged for a TTL of its own clock
        self.proxy = self.new_proxy()
        self.start_submit()
        while (taken := leases.read(self.store)) is None or taken.generation == held.generation:
            if time.time() > deadline or self.submit.poll() is not None:
                raise AssertionError(f"the new runtime took no lease: {self.submit.poll()}")
            time.sleep(0.1)
        self.running_attempt(after=record["attempt"])  # the new runtime's trainer runs
        old_proxy.resume()
        record["exit"] = old_submit.wait(timeout=600)
        self.wait_gone(trainer_pid, timeout=120)
        record["generations"] = [held.generation, taken.generation if taken else None]
        # what the fenced runtime committed after the takeover (a commit whose fence check passed
        # before the stall): allowed to exist, never to be preferred
        record["late_commits"] = [m.id for m in list_checkpoints(self.store).committed
                                  if (m.lease_generation or 0) == held.generation
                                  and taken is not None and m.created_at > taken.acquired_at]
        self.stalled.append(record)

    def late_commits(self) -> list[str]:
        return [c for record in self.stalled for c in record["late_commits"]]

    def run(self, plan: list[str]) -> None:
        self.start_submit()
        for kind in plan:
            if not self.event(kind):
                break
        self.submit.wait(timeout=1800)

    def stop(self) -> None:
        if self.submit is not None and self.submit.poll() is None:
            os.killpg(self.submit.pid, signal.SIGKILL)
        for proxy in self.proxies:
            proxy.stop()
        self.gcs.stop()

    # ------------------------------------------------------------------ what happened
    def summary(self) -> dict:
        state = self.state()
        attempts = state.get("attempts") or []
        lost: dict[str, list[int]] = {k: [] for k in KINDS if k != "second"}
        # where each attempt resumed and what it skipped, as its trainer reported it (the state of
        # an attempt whose runtime vanished may not have recorded it yet)
        heartbeat = functools.cache(self.heartbeat)  # each attempt's file read once
        reported = {a["number"]: self.reported_resume(a, heartbeat(a["number"])) for a in attempts}
        skipped = {n: [s.split(":")[0] for s in r["skipped"]] for n, r in reported.items()}
        past_corrupted = []  # per entry of lost["kill"]: the next attempt had to skip a corrupted checkpoint
        for record in self.log:  # the step the attempt reached -> where the next one started
            if record["kind"] == "second":
                continue
            reached, resumed = heartbeat(record["attempt"]).get("step"), \
                heartbeat(record["attempt"] + 1).get("start_step")
            if reached is not None and resumed is not None:
                lost[record["kind"]].append(reached - resumed)
                # a save the attempt had passed (saves begin once their step is done) was not
                # committed: the kill landed inside that write
                passed = (reached - 1) // SAVE_STEPS * SAVE_STEPS
                record["in_write"] = record.get("mid_write", False) or resumed < passed
                if record["kind"] == "kill":
                    past_corrupted.append(any(c in self.corrupted for c in skipped.get(record["attempt"] + 1, [])))
        # a corrupted id is set apart (moved, never deleted) and committed again, whole, when training
        # reaches it once more (issue 23): a resume from it after that loads the new bytes
        recommitted = {n["id"]: n["at"] for n in list_set_apart(self.store) if n.get("id") in self.corrupted}
        resumed_corrupt = [a["number"] for a in attempts if (r := reported[a["number"]]["resumed_from"])
                           and r["id"] in self.corrupted and a["started_at"] > self.corrupted[r["id"]]
                           and not (r["id"] in recommitted and a["started_at"] > recommitted[r["id"]])]
        skipped_corrupt = sum(1 for ids in skipped.values() for c in ids if c in self.corrupted)
        seconds = [r for r in self.log if r["kind"] == "second"]
        late = set(self.late_commits())
        resumed_late = [n for n, r in reported.items() if r["resumed_from"] and r["resumed_from"]["id"] in late]
        return {"events": dict(Counter(r["kind"] for r in self.log)),
                "kills_mid_write": sum(1 for r in self.log if r.get("mid_write")),  # a torn folder seen
                # ... or the next attempt fell back past a save the killed one had begun (on GCS a
                # file is visible only once its upload is finished: a torn folder may show nothing)
                "kills_in_a_write": sum(1 for r in self.log if r["kind"] == "kill" and r.get("in_write")),
                "sigterm_exits": [r["exit"] for r in self.log if r["kind"] == "sigterm"],
                "second_submits": {"exits": [r["exit"] for r in seconds],
                                   "said_held": sum(r["said_held"] for r in seconds),
                                   "lease_untouched": sum(r["lease_untouched"] for r in seconds),
                                   "first_alive": sum(r["first_alive"] for r in seconds)},
                "stalled_runtimes": {"exits": [r["exit"] for r in self.stalled],
                                     "generations": [r["generations"] for r in self.stalled],
                                     "late_commits": self.late_commits(), "resumed_from_late": resumed_late},
                "attempts": len(attempts), "submits": self.submits, "phase": state.get("phase"),
                "warm_attempts": sum(1 for a in attempts if a.get("warm_spare")),
                "requests": sum(p.count for p in self.proxies),
                "faults_injected": sum(p.failed for p in self.proxies),
                "corrupted": sorted(self.corrupted), "skipped_corrupted": skipped_corrupt,
                "resumed_from_corrupted": resumed_corrupt, "recommitted": sorted(recommitted), "steps_lost": lost,
                # attempts whose trainer resumed but whose record in state.json does not say so
                "resume_not_recorded": [a["number"] for a in attempts if reported[a["number"]]["resumed_from"]
                                        and not a.get("resumed_from")],
                # a kill after which a corrupted checkpoint was skipped falls back one save further
                "kills_past_a_corrupted_checkpoint": [n for n, p in zip(lost["kill"], past_corrupted, strict=True) if p],
                "kills_not_past_a_corrupted_checkpoint": [n for n, p in zip(lost["kill"], past_corrupted, strict=True) if not p],
                "reasons": dict(Counter((a.get("reason") or "").split(" (")[0].split(":")[0] for a in attempts))}


def reference(folder: Path, epochs: int) -> dict:
    """The same job trained once, uninterrupted, on local disk by the trainer alone."""
    spec = quick_spec(folder, name="chaos", storage={"root": str(folder / "ref-root"), "save_steps": SAVE_STEPS},
                      train={"epochs": epochs, "patience": 1000})
    subprocess.run([sys.executable, "-m", "timellm_job.trainer", "run", str(spec)], cwd=REPO, check=True,
                   capture_output=True, timeout=1800)
    return final_state(job_store(str(folder / "ref-root"), "chaos"))


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=120)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--out", help="also write the summary (JSON) there")
    a = ap.parse_args()
    from benchmarks.common import machine

    folder = Path(tempfile.mkdtemp(prefix="chaos-", dir="/var/tmp"))
    (folder / "ref").mkdir()
    start = time.time()
    expected = reference(folder / "ref", a.epochs)
    chaos = Chaos(folder, a.epochs, seed=a.seed)
    try:
        chaos.run(random_plan(a.events, a.seed))
        summary = chaos.summary()
        got = final_state(chaos.store) if summary["phase"] == "completed" else {}
    finally:
        chaos.stop()
    summary["plan"] = {"events": a.events, "seed": a.seed, "epochs": a.epochs}
    summary["bit_identical"] = got == expected
    summary["final_step"] = got.get("final_step")
    summary["wall_s"] = round(time.time() - start)
    summary["machine"] = machine()
    lost = summary["steps_lost"]
    summary["steps_lost_summary"] = {k: {"n": len(v), "max": max(v), "median": statistics.median(v)}
                                     for k, v in lost.items() if v}
    print(json.dumps(summary, indent=1))
    print(f"folder: {folder}")
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()

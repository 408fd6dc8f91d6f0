"""Two folders kept in sync late, the way Drive for desktop keeps two machines' mounts of one
Drive folder: a change on one side (a new or rewritten file, a deletion) reaches the other side
``lag`` seconds after it was last seen changing, each file by itself (no folder is ever moved
as a whole, so a renamed folder arrives as its files, one at a time); when a file changed on
both sides since they last agreed, the newer modification wins. A direction can be paused (a
runtime whose uploads fall behind) and resumed; what changed meanwhile then flows.

Each file lands on the far side through a temporary name and a rename (a reader sees the old
bytes or the new), with its modification time kept, so it is not sent back.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

Signature = tuple[int, int]  # (mtime_ns, size)


def _scan(root: Path) -> dict[str, Signature]:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if ".mirror-" in name:
                continue
            path = Path(folder) / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out[str(path.relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return out


class LaggingMirror:
    def __init__(self, a: Path, b: Path, lag: float = 1.0, tick: float = 0.1):
        self.sides = {"a": Path(a), "b": Path(b)}
        self.lag, self.tick = lag, tick
        self.paused: set[str] = set()  # directions held back: "a->b", "b->a"
        self.agreed: dict[str, Signature | None] = {}  # what both sides last held, per file
        self.seen: dict[tuple[str, str], tuple[Signature | None, float]] = {}  # (side, rel) -> (sig, since)
        self.copied = self.deleted = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lagging-mirror", daemon=True)

    def start(self) -> LaggingMirror:
        for side in self.sides.values():
            side.mkdir(parents=True, exist_ok=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=30)

    def pause(self, direction: str) -> None:
        self.paused.add(direction)

    def resume(self, direction: str) -> None:
        self.paused.discard(direction)

    def settled(self) -> bool:
        """Both sides hold the same files (nothing in flight, nothing paused)."""
        return not self.paused and _scan(self.sides["a"]) == _scan(self.sides["b"])

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync_once()
            except Exception as exc:  # noqa: BLE001 - a file vanished mid-copy: next tick sees it anew
                self.errors.append(repr(exc))
            time.sleep(self.tick)

    def _stable(self, side: str, rel: str, sig: Signature | None, now: float) -> bool:
        """True once ``side``'s version of ``rel`` has stood unchanged for ``lag`` seconds."""
        prev = self.seen.get((side, rel))
        if prev is None or prev[0] != sig:
            self.seen[(side, rel)] = (sig, now)
            return self.lag <= 0
        return now - prev[1] >= self.lag

    def _sync_once(self) -> None:
        now = time.time()
        scans = {side: _scan(root) for side, root in self.sides.items()}
        for rel in sorted(set(scans["a"]) | set(scans["b"]) | set(self.agreed)):
            a, b, base = scans["a"].get(rel), scans["b"].get(rel), self.agreed.get(rel)
            if a == b:
                self.agreed[rel] = a
                if a is None:
                    self.agreed.pop(rel, None)
                continue
            changed = [s for s, sig in (("a", a), ("b", b)) if sig != base]
            if len(changed) == 2:  # both changed since they agreed: the newer modification wins
                if a is None or b is None:
                    changed = ["a" if a is not None else "b"]  # a rewrite beats a deletion
                else:
                    changed = ["a" if a[0] >= b[0] else "b"]
            src = changed[0]
            dst = "b" if src == "a" else "a"
            sig = scans[src].get(rel)
            if f"{src}->{dst}" in self.paused or not self._stable(src, rel, sig, now):
                continue
            if self._apply(src, dst, rel, sig):
                self.agreed[rel] = sig
                if sig is None:
                    self.agreed.pop(rel, None)

    def _apply(self, src: str, dst: str, rel: str, sig: Signature | None) -> bool:
        target = self.sides[dst] / rel
        if sig is None:  # deleted on src
            try:
                target.unlink()
            except FileNotFoundError:
                pass
            self._prune(target.parent, self.sides[dst])
            self.deleted += 1
            return True
        source = self.sides[src] / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".mirror-{target.name}"
        try:
            shutil.copy2(source, tmp)
        except FileNotFoundError:
            return False  # gone meanwhile: the next tick sees the deletion
        st = tmp.stat()
        if (st.st_mtime_ns, st.st_size) != sig:  # rewritten while we copied: next tick
            tmp.unlink()
            return False
        os.replace(tmp, target)
        self.copied += 1
        return True

    @staticmethod
    def _prune(folder: Path, root: Path) -> None:
        """Remove folders left empty by deletions (Drive shows no empty leftovers of a removed folder)."""
        while folder != root:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

"""``status --plot``: training and validation loss, with every restart and preemption marked and
the work each loss cost shaded: the steps an attempt had trained past the checkpoint the next one
resumed from (they were trained again)."""

from __future__ import annotations

from typing import Any


def plot_losses(records: list[dict], attempts: list[dict[str, Any]], out_path: str, title: str) -> dict[str, Any]:
    """Write the plot; returns what it marked (``lost``: the shaded (first, last) step spans)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for r in records:  # a step retrained after a restart keeps its latest value
        if "loss" in r:
            train[r["step"]] = r["loss"]
        if "val_loss" in r:
            val[r["step"]] = r["val_loss"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if train:
        steps = sorted(train)
        ax.plot(steps, [train[s] for s in steps], lw=0.8, label="training loss (MSE)")
    if val:
        steps = sorted(val)
        ax.plot(steps, [val[s] for s in steps], "o-", label="validation loss (MSE)")
    lost = []
    for prev, a in zip(attempts, attempts[1:], strict=False):
        step = a.get("start_step")
        if step is None:
            continue
        reached = prev.get("end_step")
        if reached is not None and reached > step:  # trained, lost with the attempt, trained again
            ax.axvspan(step, reached, color="tab:red", alpha=0.15, lw=0,
                       label="lost work (trained again)" if not lost else None)
            lost.append((step, reached))
        preempt = "preempt" in (prev.get("reason") or "")
        ax.axvline(step, color="tab:orange" if preempt else "tab:red", ls="--", lw=1)
        ax.annotate(("preempted" if preempt else "restart") + f" #{a['number']}", (step, 1), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return {"lost": lost}

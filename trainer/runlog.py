"""Run logs: a JSONL line per record and a PNG plot of the curves.

Every trainer writes ``metrics.jsonl`` (one JSON object per step or event, each with a
``step``) and redraws ``metrics.png`` from it. Resuming truncates records past the resumed step,
so the log always describes exactly one history.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


class RunLog:
    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None:
            self.path.write_text("")
        self._f = open(self.path, "a", buffering=1)

    def write(self, **record) -> None:
        record.setdefault("time", round(time.time(), 3))  # wall clock: gives iterations per second
        self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_metrics(jsonl: str | Path, png: str | Path, keys: list[str], title: str = "",
                 event: str = "step") -> Path:
    """One panel per key present in the records of one kind (``event``; steps by default), raw
    values faint and a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_jsonl(jsonl) if r.get("event", "step") == event]
    keys = [k for k in keys if any(k in r for r in records)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.2 * max(1, len(keys)), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        if not pts:
            continue
        steps, vals = zip(*pts)
        ax.plot(steps, vals, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(list(vals), max(1, len(vals) // 50)), linewidth=1.6)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)

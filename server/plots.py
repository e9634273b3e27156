"""A run's metrics per round as a PNG: ranking quality, training loss, and what was left out."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shared_model.files import write_atomic  # noqa: E402


def plot_rounds(metrics: list[dict], path: Path, title: str) -> Path:
    fig, (quality, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("valid NDCG@10", "-o"), ("test NDCG@10", "-s"), ("valid HR@10", "--o"), ("test HR@10", "--s")):
        points = [(m["round"], m[key]) for m in metrics if key in m]
        if points:
            quality.plot(*zip(*points), style, label=key, markersize=3)
    quality.set_xlabel("round")
    quality.set_title("federated evaluation (full ranking)")
    quality.legend()
    quality.grid(alpha=0.3)
    points = [(m["round"], m["train loss"]) for m in metrics if "train loss" in m]
    if points:
        loss.plot(*zip(*points), "-", color="tab:red")
    loss.set_xlabel("round")
    loss.set_title("mean client training loss")
    loss.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, png.getvalue())  # a viewer polling the run never reads half a PNG
    return path

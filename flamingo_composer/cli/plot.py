"""Plot a training run's curves into one PNG.

    flamingo-plot RUN_DIR [--out curves.png] [--source file|wandb]

RUN_DIR is the run's folder (`runs/<run_name>/` after `make train`: its Composer file log `logs-rank0.txt`, one
segment per start of the run, drawn as one run), or a W&B offline run folder (`wandb/offline-run-*`), or a folder
holding one. Panels (those with data): train loss (total and one curve per dataset); z-loss per dataset (mean
logsumexp^2, logged at any weight); held-out cross-entropy and token accuracy per dataset (the `eval` loader);
every other evaluator's metrics; the cross-attention gates, tanh(attn_gate) and tanh(ff_gate) per layer (the
`xattn_gates` monitor); learning rate per parameter group; throughput (samples/s and tokens/s). Prints what it
drew.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    select: Callable[[str], bool]  # which metric names go on this panel


def _is_evaluator_metric(name: str) -> bool:
    return name.startswith("metrics/") and not name.startswith(("metrics/eval/", "metrics/train/"))


PANELS = [
    Panel("train loss", "cross-entropy (nats)", lambda n: n.startswith("loss/train/") and "/z_loss/" not in n),
    Panel("z-loss", "mean logsumexp(logits)^2", lambda n: n.startswith("loss/train/z_loss/")),
    Panel("held-out cross-entropy", "nats", lambda n: n.startswith("metrics/eval/") and "CrossEntropy" in n),
    Panel("held-out token accuracy", "accuracy", lambda n: n.startswith("metrics/eval/") and "Accuracy" in n),
    Panel("evaluators", "value", _is_evaluator_metric),
    Panel("cross-attention gates: tanh(attn_gate)", "tanh(gate)", lambda n: n.startswith("xattn_gates/attn/")),
    Panel("cross-attention gates: tanh(ff_gate)", "tanh(gate)", lambda n: n.startswith("xattn_gates/ff/")),
    Panel("learning rate", "lr", lambda n: n.startswith("lr-")),
    Panel("throughput", "per second", lambda n: n in ("throughput/samples_per_sec", "throughput/tokens_per_sec")),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run folder (runs/<run_name>/) or W&B offline run folder")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png)")
    parser.add_argument("--source", choices=["file", "wandb"], default="file", help="which log when both exist")
    return parser.parse_args(argv)


def plot_metrics(metrics: dict[str, list[tuple[int, float]]], title: str = ""):
    """(matplotlib Figure, {panel title: [metric names drawn]}); panels without data are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filled = [(panel, sorted(n for n in metrics if panel.select(n) and metrics[n])) for panel in PANELS]
    filled = [(panel, names) for panel, names in filled if names]
    if not filled:
        raise ValueError("the log holds none of the plotted metrics (loss/train/*, metrics/*, lr-*, throughput/*)")
    cols = 2 if len(filled) > 1 else 1
    rows = -(-len(filled) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    drawn = {}
    for ax, (panel, names) in zip(axes.flat, filled):
        for name in names:
            steps, values = zip(*metrics[name])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=_label(name))
        if panel.title == "throughput":
            ax.set_yscale("log")
        ax.set_title(panel.title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small" if len(names) <= 8 else "x-small", ncol=1 if len(names) <= 8 else 2)
        drawn[panel.title] = names
    for ax in list(axes.flat)[len(filled):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig, drawn


def _label(name: str) -> str:
    for prefix in ("loss/train/", "metrics/eval/", "metrics/", "throughput/", "lr-", "xattn_gates/attn/",
                   "xattn_gates/ff/"):  # fmt: skip
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from flamingo_composer.training.run_logs import read_run_metrics

    try:
        metrics, source = read_run_metrics(args.run_dir, prefer=args.source)
        fig, drawn = plot_metrics(metrics, title=f"{Path(args.run_dir).resolve().name}")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run_dir) / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"read {source}")
    for panel, names in drawn.items():
        print(f"  {panel}: {', '.join(f'{n} ({len(metrics[n])} points)' for n in names)}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

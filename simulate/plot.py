"""PNG plots of SLO attainment against arrival rate, one line per policy (needs the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

from simulate.metrics import SimResult
from transport.errors import ErrorCode, PdorchError


def plot_attainment(curves: dict[str, list[SimResult]], target: float, out: Path, title: str) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PdorchError(ErrorCode.CONFIG, "plotting needs matplotlib: pip install 'pdorch[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for policy, results in curves.items():
        pts = sorted((r.request_rate, r.attainment) for r in results)
        ax.plot([p[0] for p in pts], [p[1] * 100 for p in pts], marker="o", label=policy)
    ax.axhline(target * 100, color="grey", linestyle="--", linewidth=1, label=f"{target:.0%} target")
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("requests meeting TTFT and TPOT SLOs (%)")
    ax.set_ylim(0, 101)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out

"""What every stage returns: counts, timing, metrics and where its outputs are."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageResult:
    """The outcome of one stage run."""

    stage: str
    rows: int
    seconds: float
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    usage: dict[str, float] = field(default_factory=dict)
    """What the stage reserved and its cost (`td_ray.tracking.StageRun.usage`)."""
    currency: str = ""

    @property
    def throughput(self) -> float:
        """Rows per second."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for logs and the CLI."""
        metrics = ", ".join(f"{name}={value:.4f}" for name, value in self.metrics.items())
        where = ", ".join(self.outputs.values())
        used = ""
        if self.usage:
            used = f"; {self.usage['cpu_hours']:.4f} CPU-h, {self.usage['gpu_hours']:.4f} GPU-h" + (
                f", cost {self.usage['cost']:.4f} {self.currency}" if "cost" in self.usage else "")
        return (
            f"{self.stage}: {self.rows} rows in {self.seconds:.1f}s ({self.throughput:.1f} rows/s)" + used
            + (f"; {metrics}" if metrics else "")
            + (f" -> {where}" if where else "")
        )

"""What every demo shares: options, the backend choice, a training loop with a progress bar, plots, the report."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import use_backend
from ..functional import current_backend
from ..registry import Query, registry


class MissingDependencyError(ImportError):
    """A demo's optional package is not installed; the message names it and the extra that installs it."""


@dataclass
class DemoOptions:
    """backend: a seqfast backend name or "auto"; quick: a seconds-long run (small data, few steps) that checks the
    pipeline end to end; out: the folder for plots and other files; progress: show the progress bar."""

    backend: str = "auto"
    quick: bool = False
    out: Path = Path(".")
    seed: int = 0
    progress: bool = True
    threads: int | None = None  # torch's intra-op threads for the run; None keeps torch's default

    def __post_init__(self) -> None:
        self.out = Path(self.out)


def check_options(options: DemoOptions, cell: str) -> None:
    """Raise ValueError naming the option when `options` cannot run `cell` here, before any data is loaded."""
    if options.threads is not None and options.threads < 1:
        raise ValueError(f"--threads: expected a positive number of threads, got {options.threads}")
    if options.backend == "auto":
        return
    try:
        backend = registry.get_backend(options.backend)
    except ValueError as exc:
        raise ValueError(f"--backend: {exc}") from None
    if not backend.available():
        raise ValueError(f"--backend: {options.backend!r} cannot run here: {backend.unavailable_reason()}")
    reasons = backend.not_supported_reasons(Query(registry.get_cell(cell), device="cpu", hidden_size=64,
                                                  requires_grad=True))
    if reasons:
        raise ValueError(f"--backend: {options.backend!r} cannot train {cell} on the CPU: {'; '.join(reasons)}")


@contextlib.contextmanager
def run_context(options: DemoOptions) -> Iterator[None]:
    """Run under `options.backend` and `options.threads`, restoring torch's thread count afterwards."""
    threads = torch.get_num_threads()
    try:
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        with use_backend(options.backend):
            yield
    finally:
        torch.set_num_threads(threads)


def backend_in_use(cell: str, hidden_size: int) -> str:
    """The backend that runs `cell` for training on the CPU now (the name behind "auto", too)."""
    return current_backend(cell, hidden_size=hidden_size, requires_grad=True)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    seconds: list[float] = field(default_factory=list)  # wall time per epoch

    @property
    def seconds_per_epoch(self) -> float:
        return sum(self.seconds) / max(len(self.seconds), 1)


def train(epochs: int, steps_per_epoch: int, step: Callable[[int, int], float], options: DemoOptions,
          description: str = "training", log: TrainLog | None = None) -> TrainLog:
    """Call `step(epoch, i)` (one optimisation step, returning its loss) `steps_per_epoch` times per epoch, with a
    rich progress bar that shows the running loss; returns the per-epoch mean losses and wall times."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    log = log or TrainLog()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("loss {task.fields[loss]}"))
    with Progress(*columns, disable=not options.progress, transient=False) as progress:
        task = progress.add_task(description, total=epochs * steps_per_epoch, loss="-")
        for epoch in range(epochs):
            start, total = time.perf_counter(), 0.0
            for i in range(steps_per_epoch):
                loss = step(epoch, i)
                total += loss
                progress.update(task, advance=1, loss=f"{loss:.4f}")
            log.seconds.append(time.perf_counter() - start)
            log.losses.append(total / steps_per_epoch)
    return log


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule,
                   max_norm: float | None) -> float:
    """Backpropagate `loss`, clip the gradients' norm to `max_norm` (None: no clipping), then step `optimizer` and
    its learning-rate `schedule`; returns the loss's value."""
    optimizer.zero_grad()
    loss.backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    schedule.step()
    return loss.item()


def pyplot():
    """matplotlib's pyplot on the Agg backend: demos write files and never open a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, options: DemoOptions, name: str) -> Path:
    options.out.mkdir(parents=True, exist_ok=True)
    path = options.out / name
    fig.savefig(path, dpi=80, bbox_inches="tight")
    pyplot().close(fig)
    return path


@dataclass
class DemoResult:
    """A demo's figures: `table[row][metric]` for the model and every baseline, all on the same split.

    `model` names the trained model's row, `trivial` the baseline that even `--quick` must beat on `primary`.
    """

    name: str
    evaluation: str
    model: str
    trivial: str
    primary: str
    table: dict[str, dict[str, float]]
    higher_is_better: frozenset[str]
    backend: str
    epochs: int
    seconds_per_epoch: float
    train_seconds: float
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def value(self, row: str | None = None, metric: str | None = None) -> float:
        return self.table[row or self.model][metric or self.primary]

    def beats(self, row: str, metric: str | None = None) -> bool:
        """Whether the model is strictly better than `row` on `metric` (the primary one by default)."""
        metric = metric or self.primary
        mine, theirs = self.value(self.model, metric), self.value(row, metric)
        return mine > theirs if metric in self.higher_is_better else mine < theirs

    def print(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{self.name}: {self.evaluation}")
        metrics = list(next(iter(self.table.values())))
        table.add_column("model")
        for metric in metrics:
            arrow = "↑" if metric in self.higher_is_better else "↓"
            table.add_column(f"{metric} {arrow}", justify="right")
        for row, values in self.table.items():
            table.add_row(row if row != self.model else f"[bold]{row}[/bold]",
                          *(f"{values[m]:.4g}" for m in metrics))
        console = Console()
        console.print(table)
        for note in self.notes:
            console.print(note, markup=False, highlight=False)
        console.print(f"backend {self.backend}: {self.epochs} epochs, {self.seconds_per_epoch:.3g} s per epoch, "
                      f"{self.train_seconds:.1f} s training", highlight=False)
        for path in self.files:
            console.print(f"wrote {path}", highlight=False)

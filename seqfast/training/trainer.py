"""A compact training loop over torch.optim: clipping, validation, early stopping, checkpoints, a CSV of metrics.

It hides nothing of torch: the model, optimizer (Adam, RMSprop, any `torch.optim.Optimizer`) and scheduler are the
user's own, and the forward is the user's `step(model, batch) -> loss` function.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["Trainer"]

StepResult = Tensor | tuple[Tensor, dict[str, Any]]


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / DataParallel, so checkpoints load into a bare model."""
    return model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                                              torch.nn.DataParallel)) else model


def _number(value: Any) -> float:
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


class _Bar:
    """Per-epoch progress: rich if installed, else tqdm if installed, else one plain line per epoch."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.kind = next((k for k in ("rich", "tqdm") if importlib.util.find_spec(k)), "plain") if enabled else None

    def iterate(self, batches: Iterable, desc: str, running: Callable[[], str]) -> Iterator:
        total = len(batches) if hasattr(batches, "__len__") else None
        if self.kind == "rich":
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                task = bar.add_task(desc, total=total)
                for batch in batches:
                    yield batch
                    bar.update(task, advance=1, description=f"{desc} {running()}")
        elif self.kind == "tqdm":
            from tqdm import tqdm

            with tqdm(batches, desc=desc, total=total, leave=False) as bar:
                for batch in bar:
                    yield batch
                    bar.set_postfix_str(running())
        else:
            yield from batches

    def line(self, row: dict[str, Any]) -> None:
        if self.enabled:
            print("  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  file=sys.stderr if self.kind == "plain" else sys.stdout, flush=True)


class Trainer:
    """Fit a model with `step(model, batch)` as its forward and loss.

    Args:
        model: the module, or a DistributedDataParallel wrapper of it: then each epoch's metrics are averaged
            over the ranks (all stop early together), and only rank 0 writes files and shows progress.
        optimizer: any `torch.optim.Optimizer`, e.g. `torch.optim.Adam(model.parameters(), 1e-3)` or `RMSprop`.
        step: `step(model, batch) -> loss`, or `-> (loss, {name: value})` for extra metrics. Under validation it
            runs in `model.eval()` and `torch.no_grad()`.
        scheduler: a `torch.optim.lr_scheduler` stepped once per epoch (`ReduceLROnPlateau` gets the monitored
            metric).
        clip_grad_norm: clip the gradients' total 2-norm to this (`torch.nn.utils.clip_grad_norm_`); the mean
            norm before clipping is reported as `grad_norm`.
        clip_grad_value: clip each gradient element to [-v, v] (`torch.nn.utils.clip_grad_value_`).
        monitor: the metric early stopping and the best checkpoint follow; default `val_loss` when `fit` gets
            validation data, else `loss`.
        mode: "min" or "max": whether a lower or a higher `monitor` is better.
        patience: stop after this many epochs in a row without an improvement by more than `min_delta`
            (None: never stop early).
        min_delta: the smallest change of `monitor` that counts as an improvement.
        checkpoint: a path; after every epoch the whole training state (model, optimizer, scheduler, epoch, best
            metric, early-stopping counter, history, RNG states) is saved there, and the model alone to
            `<name>.best<suffix>` when `monitor` improved. `fit(resume=True)` continues from it.
        csv_path: a path; the metrics of every epoch (one row per epoch) are written there.
        progress: show a progress bar (rich, else tqdm, else a plain line per epoch).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 step: Callable[[torch.nn.Module, Any], StepResult], *, scheduler: Any = None,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 monitor: str | None = None, mode: str = "min", patience: int | None = None,
                 min_delta: float = 0.0, checkpoint: str | os.PathLike | None = None,
                 csv_path: str | os.PathLike | None = None, progress: bool = True) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"Trainer: mode must be 'min' or 'max', got {mode!r}")
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ValueError(f"Trainer: patience must be a positive int or None, got {patience!r}")
        if min_delta < 0:
            raise ValueError(f"Trainer: min_delta must be >= 0, got {min_delta!r}")
        for name, value in (("clip_grad_norm", clip_grad_norm), ("clip_grad_value", clip_grad_value)):
            if value is not None and not value > 0:
                raise ValueError(f"Trainer: {name} must be a positive number or None, got {value!r}")
        self.model, self.optimizer, self.step, self.scheduler = model, optimizer, step, scheduler
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.csv_path = None if csv_path is None else Path(csv_path)
        self.main = _is_main_process()
        self.bar = _Bar(progress and self.main)
        self.epoch = 0  # epochs completed
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []

    # --- the loop -------------------------------------------------------------------------------------------------
    def fit(self, train: Iterable, epochs: int, val: Iterable | None = None,
            resume: bool | str | os.PathLike = False) -> list[dict[str, Any]]:
        """Train until `epochs` epochs are completed in all, or early stopping stops it; returns the history (one
        dict of metrics per epoch). `resume=True` loads `checkpoint` first when it exists; a path loads that file.
        """
        if resume:
            path = self.checkpoint if resume is True else Path(resume)
            if path is None:
                raise ValueError("Trainer.fit: resume=True needs the Trainer's checkpoint path")
            if path.exists():
                self.load(path)
        monitor = self.monitor or ("val_loss" if val is not None else "loss")
        while self.epoch < epochs and not self.stopped:
            row = {"epoch": self.epoch + 1, **self._train_epoch(train)}
            if val is not None:
                row.update({f"val_{k}": v for k, v in self.evaluate(val).items()})
            row = self._mean_over_ranks(row)
            if monitor not in row:
                raise KeyError(f"Trainer: monitor={monitor!r} is not among the epoch's metrics {list(row)}")
            if self.scheduler is not None:
                plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
                self.scheduler.step(row[monitor]) if plateau else self.scheduler.step()
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            self.epoch += 1
            improved = self._record(row[monitor])
            self.history.append(row)
            self.bar.line(row)
            if self.main:
                self._write_csv()
                if self.checkpoint is not None:
                    self.save(self.checkpoint)
                    if improved:
                        torch.save(_unwrap(self.model).state_dict(),
                                   self.checkpoint.with_suffix(".best" + self.checkpoint.suffix))
        return self.history

    @staticmethod
    def _mean_over_ranks(row: dict[str, Any]) -> dict[str, Any]:
        """Under torch.distributed, every metric averaged over the ranks, so that all ranks log, schedule and
        stop early alike (a rank stopping alone would leave the others waiting in their next all-reduce)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return row
        cuda = torch.distributed.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        keys = [k for k in row if k != "epoch"]
        values = torch.tensor([row[k] for k in keys], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
        return {"epoch": row["epoch"], **dict(zip(keys, values.tolist(), strict=True))}

    @property
    def stopped(self) -> bool:
        """Early stopping has fired: `patience` epochs in a row brought no improvement."""
        return self.patience is not None and self.bad_epochs >= self.patience

    def _record(self, value: float) -> bool:
        better = self.best is None or (value < self.best - self.min_delta if self.mode == "min"
                                       else value > self.best + self.min_delta)
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, self.epoch, 0
        else:
            self.bad_epochs += 1
        return better

    def _run(self, batch: Any) -> tuple[Tensor, dict[str, Any]]:
        result = self.step(self.model, batch)
        loss, metrics = result if isinstance(result, tuple) else (result, {})
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"Trainer: step must return a scalar loss Tensor (or (loss, metrics)), got "
                            f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
        return loss, metrics

    def _train_epoch(self, train: Iterable) -> dict[str, float]:
        self.model.train()
        sums: dict[str, float] = {}
        count = 0

        def running() -> str:
            return f"loss {sums['loss'] / count:.4g}" if count else ""

        for batch in self.bar.iterate(train, f"epoch {self.epoch + 1}", running):
            self.optimizer.zero_grad(set_to_none=True)
            loss, metrics = self._run(batch)
            loss.backward()
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if self.clip_grad_value is not None:
                torch.nn.utils.clip_grad_value_(params, self.clip_grad_value)
            if self.clip_grad_norm is not None:
                metrics = {**metrics, "grad_norm": torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)}
            self.optimizer.step()
            count += 1
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + _number(v)
        if count == 0:
            raise ValueError("Trainer.fit: the training data yielded no batches")
        return {k: v / count for k, v in sums.items()}

    @torch.no_grad()
    def evaluate(self, data: Iterable) -> dict[str, float]:
        """The mean loss and metrics of `step` over `data`, in eval mode without gradients."""
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, float] = {}
        count = 0
        try:
            for batch in data:
                loss, metrics = self._run(batch)
                count += 1
                for k, v in {"loss": loss, **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + _number(v)
        finally:
            self.model.train(was_training)
        if count == 0:
            raise ValueError("Trainer.evaluate: the data yielded no batches")
        return {k: v / count for k, v in sums.items()}

    def _write_csv(self) -> None:
        if self.csv_path is None:
            return
        fields = list(dict.fromkeys(k for row in self.history for k in row))
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.history)

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where training stands."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if "numpy" in sys.modules:
            name, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
            rng["numpy"] = (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
        return {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "history": self.history, "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise ValueError(f"Trainer.load_state_dict: the checkpoint {'has no' if self.scheduler else 'has a'} "
                             f"scheduler state, this Trainer {'has' if self.scheduler else 'has no'} scheduler")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.best, self.best_epoch = state["epoch"], state["best"], state["best_epoch"]
        self.bad_epochs, self.history = state["bad_epochs"], list(state["history"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "numpy" in rng and importlib.util.find_spec("numpy"):
            import numpy

            name, keys, pos, has_gauss, cached = rng["numpy"]
            numpy.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))

    def save(self, path: str | os.PathLike) -> None:
        """Write `state_dict()` to `path` atomically (a crash mid-write leaves the previous checkpoint)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


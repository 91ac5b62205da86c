"""Forecasting yearly sunspot numbers (statsmodels' `sunspots` data, 1700-2008) with a GRU.

Evaluation: rolling origin over the last 30 years (1979-2008), horizon 1. Every model is fitted once on
1700-1978; at each origin it forecasts the next year from the observations up to the year before, with its
parameters kept. Metrics: MAE and sMAPE (%) on the original scale, against seasonal-naive (the value 11 years
earlier, one solar cycle) and an ARIMA(9,0,0) fitted by statsmodels on the square root of the series.
The GRU also works on the square root (it evens out the variance between quiet and active cycles), reads a
window of the previous years and is an average of a few independently initialised networks.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from torch import nn

from .. import GRU
from .common import DemoOptions, DemoResult, TrainLog, backend_in_use, pyplot, save_figure, seed_everything, train

TEST_YEARS = 30
CYCLE = 11


def load_series() -> tuple[np.ndarray, np.ndarray]:
    import statsmodels.api as sm

    data = sm.datasets.sunspots.load_pandas().data
    return data["YEAR"].to_numpy(int), data["SUNACTIVITY"].to_numpy(float)


class Forecaster(nn.Module):
    """A window of past (scaled) values -> the next one: a GRU and a linear read-out of its last state."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.gru = GRU(1, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(windows.unsqueeze(-1))
        return self.head(out[:, -1]).squeeze(-1) + windows[:, -1]  # predicts the change from the last year


def windows_before(series: np.ndarray, targets: range, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.stack([series[t - window:t] for t in targets])
    return torch.tensor(x, dtype=torch.float32), torch.tensor(series[list(targets)], dtype=torch.float32)


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.abs(pred - true).mean())


def smape(pred: np.ndarray, true: np.ndarray) -> float:
    return float(100 * np.mean(2 * np.abs(pred - true) / (np.abs(pred) + np.abs(true) + 1e-12)))


def arima_forecasts(series: np.ndarray, n_train: int, order: tuple[int, int, int]) -> np.ndarray:
    """One-step forecasts for every year after the training part, parameters fitted on the training part only."""
    from statsmodels.tsa.arima.model import ARIMA

    root = np.sqrt(series)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter from the optimizer; the fit is checked by its MAE
        fitted = ARIMA(root[:n_train], order=order).fit()
        rolled = fitted.apply(root)  # same parameters, filtered through the whole series
        pred = rolled.predict(start=n_train, end=len(series) - 1)
    return np.square(np.asarray(pred))


def fit_member(x: torch.Tensor, y: torch.Tensor, hidden: int, epochs: int, seed: int, options: DemoOptions,
               description: str, log: TrainLog, batches: int = 4):
    """Train one forecaster on (windows, next values) with an L1 loss; returns its prediction function."""
    generator = seed_everything(seed)
    model = Forecaster(hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * batches)
    order: list[torch.Tensor] = []

    def step(epoch: int, i: int) -> float:
        if i == 0:
            order[:] = torch.randperm(len(x), generator=generator).chunk(batches)
        loss = nn.functional.l1_loss(model(x[order[i]]), y[order[i]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        return loss.item()

    train(epochs, batches, step, options, description, log)

    @torch.no_grad()
    def predict(windows: torch.Tensor) -> np.ndarray:
        return model(windows).numpy()

    return predict


def run(options: DemoOptions) -> DemoResult:
    years, series = load_series()
    n_train = len(series) - TEST_YEARS
    test = series[n_train:]
    window, hidden = 24, 32
    members, epochs = (1, 30) if options.quick else (5, 300)
    order = (2, 0, 0) if options.quick else (9, 0, 0)

    root = np.sqrt(series)
    mean, std = root[:n_train].mean(), root[:n_train].std()
    scaled = (root - mean) / std
    x_train, y_train = windows_before(scaled, range(window, n_train), window)
    x_test, _ = windows_before(scaled, range(n_train, len(series)), window)

    log = TrainLog()
    start = time.perf_counter()
    predictions = [fit_member(x_train, y_train, hidden, epochs, options.seed + member,
                              options, f"GRU {member + 1}/{members}", log)(x_test) for member in range(members)]
    train_seconds = time.perf_counter() - start
    gru = np.square(np.maximum(np.mean(predictions, axis=0) * std + mean, 0.0))
    naive = series[n_train - CYCLE:len(series) - CYCLE]
    arima = arima_forecasts(series, n_train, order)

    rows = {f"GRU (H={hidden}, {members} seeds)": gru, f"seasonal-naive ({CYCLE} y)": naive,
            f"ARIMA{order} on sqrt": arima}
    table = {name: {"MAE": mae(pred, test), "sMAPE %": smape(pred, test)} for name, pred in rows.items()}

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    shown = slice(n_train - 60, None)
    ax.plot(years[shown], series[shown], color="black", lw=1.5, label="observed")
    for (name, pred), style in zip(rows.items(), ("-o", ":", "--"), strict=True):
        ax.plot(years[n_train:], pred, style, ms=3, label=f"{name}: MAE {table[name]['MAE']:.1f}")
    ax.axvline(years[n_train] - 0.5, color="grey", lw=0.8)
    ax.set(xlabel="year", ylabel="sunspot number",
           title=f"one-year-ahead forecasts, rolling origin over {years[n_train]}-{years[-1]}")
    ax.legend(fontsize=8, loc="upper left")
    plot = save_figure(fig, options, "sunspots.png")

    names = list(rows)
    return DemoResult(
        name="sunspots",
        evaluation=f"rolling origin {years[n_train]}-{years[-1]}, horizon 1, fitted on {years[0]}-{years[n_train - 1]}",
        model=names[0], trivial=names[1], primary="MAE", table=table, higher_is_better=frozenset(),
        backend=backend_in_use("gru", hidden), epochs=epochs * members, seconds_per_epoch=log.seconds_per_epoch,
        train_seconds=train_seconds, files=[plot])

"""Truncated backpropagation through time (TBPTT) over long streams.

A long stream is cut into windows; the recurrent state is carried from window to window but detached, so the
backward of one update never reaches into an earlier window's graph.

TBPTT(k1, k2), after Williams & Peng (1990): every k1 new steps make one update, whose loss is taken on those k1
steps and whose gradient flows back through the last k2 steps (k2 >= k1). With k2 == k1 this is plain chunked
training. With k2 > k1 the last k2 - k1 steps before the new ones are run again (their inputs are kept): window n
covers steps [max(0, (n+1)*k1 - k2), (n+1)*k1) and starts from the state at its first step, detached; the loss is
taken on its last k1 steps only, so the earlier steps serve as a differentiable warm-up. The state handed to the
next window is the one at step max(0, (n+2)*k1 - k2), read off while this window runs (the window is run as two
calls of the forward function, split there) and detached. The cost is k2/k1 forward passes per step; the graph
of one window is freed at its backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["TBPTT", "Window", "batchify", "detach_state"]


def batchify(stream: Tensor, batch_size: int, *, batch_first: bool = False) -> Tensor:
    """Cut a long stream `[N, ...]` into `batch_size` parallel streams: `[N // batch_size, batch_size, ...]`.

    Row b is the b-th contiguous slice of the stream, so when the result is split along time, row b of one chunk
    continues row b of the previous one (what a stateful model carrying its state between chunks needs). The last
    `N % batch_size` items are dropped. With `batch_first=True` the result is `[batch_size, N // batch_size, ...]`.
    """
    if not isinstance(stream, Tensor):
        raise TypeError(f"batchify: stream must be a Tensor [N, ...], got {type(stream).__name__}")
    if stream.dim() < 1:
        raise ValueError("batchify: stream must have at least one dimension (N), got a 0-d tensor")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batchify: batch_size must be a positive int, got {batch_size!r}")
    steps = stream.shape[0] // batch_size
    if steps == 0:
        raise ValueError(f"batchify: stream of length {stream.shape[0]} is shorter than batch_size={batch_size}")
    rows = stream[: steps * batch_size].reshape(batch_size, steps, *stream.shape[1:])
    return rows if batch_first else rows.transpose(0, 1)


def detach_state(state: Any) -> Any:
    """The state with every tensor detached; tuples, lists and dicts are walked, anything else is returned as is."""
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a namedtuple
        return type(state)(*(detach_state(s) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(detach_state(s) for s in state)
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    return state


@dataclass
class Window:
    """One TBPTT update: `inputs` over steps [start, end) of the stream, the loss taken on [loss_start, end).

    `targets` (when the stream has them) covers only the loss steps. `new(t)` cuts a tensor laid out like
    `inputs` (e.g. the model's per-step output) to the loss steps.
    """

    inputs: Tensor
    targets: Tensor | None
    start: int
    loss_start: int
    end: int
    carry: int  # the next window's first step, where the carried state is read
    time_dim: int

    def new(self, t: Tensor) -> Tensor:
        return t.narrow(self.time_dim, self.loss_start - self.start, self.end - self.loss_start)


class _Buffer:
    """The steps of a stream that arrives in chunks of any length, kept from `start` on."""

    def __init__(self, time_dim: int) -> None:
        self.time_dim, self.start, self.parts = time_dim, 0, []

    @property
    def end(self) -> int:
        return self.start + sum(p.shape[self.time_dim] for p in self.parts)

    def add(self, t: Tensor) -> None:
        self.parts.append(t)

    def take(self, start: int, end: int) -> Tensor:
        """Steps [start, end), absolute positions; everything before `start` is dropped. Only the chunks these
        steps lie in take part, so the result's graph reaches no other chunk."""
        size = lambda p: p.shape[self.time_dim]  # noqa: E731
        while self.parts and self.start + size(self.parts[0]) <= start:
            self.start += size(self.parts.pop(0))
        if start > self.start:
            first = self.parts[0]
            self.parts[0] = first.narrow(self.time_dim, start - self.start, size(first) - (start - self.start))
            self.start = start
        pieces, reached = [], start
        for part in self.parts:
            if reached >= end:
                break
            pieces.append(part)
            reached += size(part)
        whole = pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.time_dim)
        return whole.narrow(self.time_dim, 0, end - start)


class TBPTT:
    """Truncated BPTT: windows over a long stream, the forward run with a carried, detached state.

    Args:
        forward: `forward(inputs, state) -> (output, state)`, e.g. a `seqfast.LSTM` (state None at first), or a
            model wrapping one. `output` is laid out like `inputs` along time.
        k1: new steps per update (the loss is taken on these).
        k2: steps the gradient flows back through, >= k1 (default k1). See the module docstring for how the
            k2 - k1 earlier steps are re-run.
        batch_first: streams are `[B, T, ...]` instead of `[T, B, ...]`.

    Example::

        tbptt = TBPTT(model, k1=35, k2=70)
        for w in tbptt.windows(batchify(tokens[:-1], 16), batchify(tokens[1:], 16)):
            loss = F.cross_entropy(tbptt(w).flatten(0, 1), w.targets.flatten())
            optimizer.zero_grad(); loss.backward(); optimizer.step()

    Iterating `windows(...)` again starts over from a fresh state (`initial_state`, default None).
    """

    def __init__(self, forward: Callable[[Tensor, Any], tuple[Tensor, Any]], k1: int, k2: int | None = None, *,
                 batch_first: bool = False, initial_state: Any = None) -> None:
        k2 = k1 if k2 is None else k2
        if not isinstance(k1, int) or k1 < 1:
            raise ValueError(f"TBPTT: k1 must be a positive int, got {k1!r}")
        if not isinstance(k2, int) or k2 < k1:
            raise ValueError(f"TBPTT: k2 must be an int >= k1={k1}, got {k2!r}")
        self.forward, self.k1, self.k2 = forward, k1, k2
        self.time_dim = 1 if batch_first else 0
        self.initial_state = initial_state
        self.state: Any = initial_state

    def reset(self, state: Any = None) -> None:
        self.state = state if state is not None else self.initial_state

    def windows(self, inputs: Tensor | Iterable, targets: Tensor | None = None) -> _Windows:
        """The windows over a stream: `inputs` (and `targets`) as whole tensors, or `inputs` as an iterable of
        chunks of any lengths along time (each a tensor, or an `(inputs, targets)` pair)."""
        if isinstance(inputs, Tensor):
            if targets is not None and (not isinstance(targets, Tensor)
                                        or targets.shape[:2] != inputs.shape[:2]):
                raise ValueError(f"TBPTT.windows: targets must be a Tensor with the inputs' first two dims "
                                 f"{tuple(inputs.shape[:2])}, got "
                                 f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}")
            chunks: Iterable = [(inputs, targets)]
        elif targets is not None:
            raise ValueError("TBPTT.windows: targets must be given inside the chunks when inputs is an iterable")
        else:
            chunks = inputs
        return _Windows(self, chunks)

    def _iterate(self, chunks: Iterable) -> Iterator[Window]:
        self.reset()
        x_buf = _Buffer(self.time_dim)
        y_buf: _Buffer | None = None
        n = 0
        for i, chunk in enumerate(chunks):
            x, y = chunk if isinstance(chunk, (tuple, list)) else (chunk, None)
            if not isinstance(x, Tensor) or x.dim() < 2:
                raise ValueError(f"TBPTT.windows: each chunk's inputs must be a Tensor with time and batch dims, "
                                 f"got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
            if i == 0 and y is not None:
                y_buf = _Buffer(self.time_dim)
            if (y is None) != (y_buf is None):
                raise ValueError(f"TBPTT.windows: chunk {i} {'lacks' if y is None else 'has'} targets, "
                                 f"chunk 0 {'has' if y is None else 'lacks'} them")
            if y is not None and y.shape[self.time_dim] != x.shape[self.time_dim]:
                raise ValueError(f"TBPTT.windows: chunk {i}'s targets have {y.shape[self.time_dim]} steps, its "
                                 f"inputs {x.shape[self.time_dim]}")
            x_buf.add(x)
            if y_buf is not None:
                y_buf.add(y)
            while x_buf.end >= (n + 1) * self.k1:
                yield self._window(n, x_buf, y_buf, last=False)
                n += 1
        if x_buf.end > n * self.k1:  # a shorter last window
            yield self._window(n, x_buf, y_buf, last=True)

    def _window(self, n: int, x_buf: _Buffer, y_buf: _Buffer | None, last: bool) -> Window:
        end = x_buf.end if last else (n + 1) * self.k1
        start = max(0, (n + 1) * self.k1 - self.k2)
        carry = max(0, (n + 2) * self.k1 - self.k2)
        loss_start = n * self.k1
        targets = None if y_buf is None else y_buf.take(loss_start, end)
        return Window(x_buf.take(start, end), targets, start, loss_start, end, min(carry, end), self.time_dim)

    def __call__(self, window: Window) -> Tensor:
        """Run the window from the carried state; return the output on its loss steps (`window.new(output)`).
        The state at `window.carry` is kept, detached, for the next window."""
        split = window.carry - window.start
        span = window.end - window.start
        x = window.inputs
        outputs = []
        state = self.state
        if split > 0:
            out, state = self.forward(x.narrow(self.time_dim, 0, split), state)
            outputs.append(out)
        carried = state
        if split < span:
            out, state = self.forward(x.narrow(self.time_dim, split, span - split), state)
            outputs.append(out)
        self.state = detach_state(carried)
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, self.time_dim)
        return window.new(output)


class _Windows:
    """Re-iterable windows over one stream; each iteration starts from a fresh state."""

    def __init__(self, tbptt: TBPTT, chunks: Iterable) -> None:
        self.tbptt, self.chunks = tbptt, chunks

    def __iter__(self) -> Iterator[Window]:
        return self.tbptt._iterate(self.chunks)

    def __len__(self) -> int:
        if not isinstance(self.chunks, list):
            raise TypeError("the number of windows over an iterable of chunks is not known in advance")
        steps = sum(x.shape[self.tbptt.time_dim] for x, _ in self.chunks)
        return -(-steps // self.tbptt.k1)

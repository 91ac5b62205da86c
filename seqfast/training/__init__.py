"""Training utilities: truncated BPTT over long streams and a compact training loop, on torch.optim."""

from .tbptt import TBPTT, Window, batchify, detach_state
from .trainer import Trainer

__all__ = ["TBPTT", "Window", "batchify", "detach_state", "Trainer"]

"""Training SPP adapters: the loop with its exactly-resuming checkpoints (`train`) and the
data files it reads (`data`)."""

from .data import DataError, Example, load_dataset, load_token_stream
from .train import TrainConfig, TrainResult, train

__all__ = [
    "DataError",
    "Example",
    "TrainConfig",
    "TrainResult",
    "load_dataset",
    "load_token_stream",
    "train",
]

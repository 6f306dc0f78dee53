"""Training SPP adapters: the loop (`train`), its checkpoints (`checkpoints`), the
distributed engine (`engine`: accelerate + FSDP2), the configuration (`config`) and the
data files it reads (`data`)."""

from .config import TrainConfig, TrainResult
from .data import DataError, Example, load_dataset, load_token_stream
from .engine import DistributedEngine, LocalEngine, make_engine
from .train import NonFiniteError, train

__all__ = [
    "DataError",
    "DistributedEngine",
    "Example",
    "LocalEngine",
    "NonFiniteError",
    "TrainConfig",
    "TrainResult",
    "load_dataset",
    "load_token_stream",
    "make_engine",
    "train",
]

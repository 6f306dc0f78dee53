"""Training SPP adapters on transformers' Trainer: `train` (train.py), the Trainer subclass
with SPP's loss (`trainer`), what Trainer lacks as callbacks (`callbacks`: signals,
non-finite steps, sealed checkpoints), checkpoint verification (`checkpoints`), the
configuration (`config`) and the data files it reads (`data`).

spp-kernels 0.2's own loop and its engine (`DistributedEngine`, `LocalEngine`,
`make_engine`) were removed in 0.3: Trainer's accelerator runs DDP, FSDP2 and DeepSpeed.
"""

import importlib
import sys
import types

from ..utils.lazy import by_module, lazy_getattr

_WHERE = by_module(
    {
        ".config": ("TrainConfig", "TrainResult"),
        ".data": ("DataError", "Example", "load_dataset", "load_token_stream"),
        ".callbacks": ("NonFiniteError",),
        ".trainer": ("ExampleCollator", "ExampleDataset", "SPPTrainer"),
    }
)


__getattr__ = lazy_getattr(__name__, _WHERE)


class _Training(types.ModuleType):
    # `training.train` is the function (as when this package imported eagerly), even after
    # the submodule of the same name is imported (the import system's setattr is ignored).
    train = property(
        lambda self: importlib.import_module(".train", __name__).train, lambda self, value: None
    )


sys.modules[__name__].__class__ = _Training


__all__ = [
    "DataError",
    "Example",
    "ExampleCollator",
    "ExampleDataset",
    "NonFiniteError",
    "SPPTrainer",
    "TrainConfig",
    "TrainResult",
    "load_dataset",
    "load_token_stream",
    "train",
]

"""Training SPP adapters: the loop (`train`), its checkpoints (`checkpoints`), the
distributed engine (`engine`: accelerate + FSDP2), the configuration (`config`) and the
data files it reads (`data`)."""

import importlib
import sys
import types

from ..utils.lazy import by_module, lazy_getattr

_WHERE = by_module(
    {
        ".config": ("TrainConfig", "TrainResult"),
        ".data": ("DataError", "Example", "load_dataset", "load_token_stream"),
        ".engine": ("DistributedEngine", "LocalEngine", "make_engine"),
        ".train": ("NonFiniteError",),
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

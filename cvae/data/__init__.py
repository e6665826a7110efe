"""Data: the lab's folder layout as uint8 tensors, and the embedded synthetic dance dataset.

The synthetic names are re-exported lazily (PEP 562) so that `python -m cvae.data.synthetic`
executes that module once, as __main__, instead of a second time after this package imported it
(runpy warns about exactly that).
"""

from cvae.data.lab import (
    DatasetError,
    TestSequence,
    check_batch_size,
    load_split,
    load_test,
    make_clips,
    to_float,
)

_SYNTHETIC = ("SIZES", "SyntheticSize", "ensure_synthetic", "generate")

__all__ = [
    "SIZES",
    "DatasetError",
    "SyntheticSize",
    "TestSequence",
    "check_batch_size",
    "ensure_synthetic",
    "generate",
    "load_split",
    "load_test",
    "make_clips",
    "to_float",
]


def __getattr__(name: str) -> object:
    if name in _SYNTHETIC:
        from cvae.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Type aliases of the public API's signatures (fastlora ships py.typed). Annotations stay
Python 3.9 compatible: Optional/Union from typing, never `X | None`."""
import os
from typing import Any, Dict, Iterable, Mapping, Union

from numpy.typing import ArrayLike, DTypeLike

PathLike = Union[str, "os.PathLike[str]"]
Record = Mapping[str, Any]                          # one Alpaca / chat / ShareGPT / text record
Params = Union[Iterable[Any], Iterable[Dict[str, Any]]]  # Parameters, or torch-style param groups
Metrics = Dict[str, Any]                            # Benchmark.evaluate()'s dict of figures

__all__ = ["ArrayLike", "DTypeLike", "Metrics", "Params", "PathLike", "Record"]

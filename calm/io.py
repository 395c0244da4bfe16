"""Strict JSON for every file and line the project writes.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which are not JSON: ``jq``,
JavaScript's ``JSON.parse`` and most strict parsers reject the whole document. Every writer in
``calm`` goes through ``to_json``, which writes a non-finite float as ``null`` and then refuses
(``allow_nan=False``) anything non-finite that slipped through. Where a value can be undefined
(a standard error of BrierLM = 0, say), the producer also records why next to it; see
``BrierAccumulator.summary``.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf), at any depth, replaced by None.

    Dicts, lists and tuples are rebuilt (tuples become lists, as JSON has no tuples); numpy and
    torch scalars that are floats are handled through ``float()``. Other values pass unchanged.
    """
    if isinstance(obj, dict):
        return {key: finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(value) for value in obj]
    if isinstance(obj, float) or (hasattr(obj, "dtype") and getattr(obj, "ndim", None) == 0 and _is_float(obj)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def _is_float(scalar: Any) -> bool:
    kind = getattr(scalar.dtype, "kind", None)  # numpy
    return kind == "f" if kind is not None else bool(getattr(scalar.dtype, "is_floating_point", False))


def to_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always yields strict JSON (non-finite floats become ``null``).

    Keyword arguments are those of ``json.dumps`` (``indent``, ``sort_keys``, ...).
    """
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)

"""Speed benchmarks of CALM against the token-level Transformer with the same backbone (paper Table 1).

- ``calm bench generate`` (:mod:`calm.bench.generate`): decoding tokens/s, greedy and at T = 1/2,
  with a per-step profile.
- ``calm bench train`` (:mod:`calm.bench.train`): training tokens/s and MFU.

Shared model construction and timing helpers live in :mod:`calm.bench.common`; the command line
in :mod:`calm.cli.experiments`. Figures and the JSON layout: ``benchmarks/README.md``.
"""

from __future__ import annotations

from calm.bench.common import SIZES, build_pair
from calm.bench.generate import bench_generate, timed_calls
from calm.bench.train import bench_train

__all__ = ["SIZES", "bench_generate", "bench_train", "build_pair", "timed_calls"]

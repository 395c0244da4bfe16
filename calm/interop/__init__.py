"""Working with the outside world: the authors' checkpoints, serving, lm-evaluation-harness.

``official`` maps the authors' checkpoint layout onto ours and ``convert`` writes it as a calm
checkpoint; ``serve`` is the OpenAI-compatible completions server; ``lm_eval`` is the
lm-evaluation-harness model.
"""

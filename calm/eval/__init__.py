"""Scoring models: BrierLM (paper §5), autoencoder reconstruction, head diagnostics, prompt following.

``brierlm`` holds the estimators, pure functions of samples and probabilities; ``brier`` runs CALM,
our token baseline or a Hugging Face model over an evaluation set to feed them. ``autoencoder``
measures reconstruction (paper §3); ``diagnostics`` and ``prompt_following`` are measures of ours,
for CALM and token models alike, that say whether a model uses its context.
"""

"""calm: Continuous Autoregressive Language Models (Shao et al., arXiv 2510.27688) in PyTorch.

Stage 1 trains a chunk autoencoder (``calm.models.autoencoder``); stage 2 trains a Transformer
that predicts the next chunk's latent vector with an energy-score head (``calm.models.calm``).
``calm.eval.brierlm`` implements BrierLM, ``calm.generate.sampling`` likelihood-free temperature sampling.
"""

__version__ = "0.1.0"

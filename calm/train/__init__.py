"""Training: one loop for every stage, the three stages, and multi-process execution.

``loop`` (optimizer, schedule, accumulation, checkpoints, exact resume), ``stages`` (the
autoencoder, CALM and the token baseline: their data, model, loss and validation),
``distributed`` and ``fsdp`` (torchrun, DDP and FSDP2).
"""

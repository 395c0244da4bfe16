"""Generation: likelihood-free temperature sampling (paper §6, Algs. 1-2), the decoding loop, and the
language-model interface that CALM and the token-level baseline share.

``sampling`` holds both temperature samplers as pure functions over draws; ``lazy_decode`` decodes
candidate chunks only as far as the samplers need them; ``engine`` runs CALM's decoding loop over
token ids; ``lm`` is the interface every caller uses (``as_language_model``: the model kind decided
once, the rules a request must follow, and the text API ``generate_text`` / ``complete``);
``batching`` decodes many sequences in one batch, joining and leaving between steps, each with its own
generator (continuous batching, for serving); ``completion`` adds stop strings and cancellation.
"""

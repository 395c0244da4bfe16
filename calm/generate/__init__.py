"""Generation: likelihood-free temperature sampling (paper §6, Algs. 1-2) and the decoding engine.

``sampling`` holds both temperature samplers as pure functions over draws; ``lazy_decode`` decodes
candidate chunks only as far as the samplers need them; ``engine`` runs the decoding loop over
token ids and the text API (``generate_text``, ``complete``); ``completion`` adds stop strings and
request checks for serving.
"""

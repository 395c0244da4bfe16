"""Model definitions: shared layers, the chunk autoencoder, CALM and the token baseline."""

"""The latent space and the text: the autoencoder, its training objective, the frozen text encoders."""

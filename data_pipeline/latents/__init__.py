"""Latent shards: image shards (webdataset tars) encoded by a VAE into data latents for data-based pi-ID."""

"""Shard-by-shard data jobs over a Ray actor pool (latent encoding, prompt encoding): resumable, with progress."""

"""Converters from other projects' checkpoint layouts into this project's diffusers-format models."""

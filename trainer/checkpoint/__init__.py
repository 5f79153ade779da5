"""Checkpoints and runs on run.output: the checkpoint store and its files, exact resume, the single-writer lease."""

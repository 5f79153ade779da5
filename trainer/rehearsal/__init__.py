"""Rehearsing a production recipe on a small machine: the one fixed shrink table and the tiny same-family model."""

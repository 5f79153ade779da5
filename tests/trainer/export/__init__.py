"""Tests of trainer/export/."""

"""Tests of trainer/rehearsal/."""

"""Tests of trainer/checkpoint/."""

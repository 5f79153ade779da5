"""Tests of trainer/teachers/."""

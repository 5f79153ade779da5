"""Tests of trainer/planner/."""

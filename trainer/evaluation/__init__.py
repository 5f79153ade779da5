"""Evaluation jobs: generate with a student and its teacher, score FID, CLIP score, diversity, IS, precision/recall."""

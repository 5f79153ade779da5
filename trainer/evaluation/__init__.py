"""Evaluation: scoring jobs (FID, CLIP score, diversity, IS, precision/recall), validation rollouts, the digits and 2-D toy benches."""

"""Pre-encoded prompt storage (bf16 / fp8 with a per-tensor scale, padding not stored) and the encode job's worker."""

"""Side-by-side experiments: compare variants, the HybridNorm study, and their reports."""

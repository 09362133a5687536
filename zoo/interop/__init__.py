"""Interoperability: Hugging Face transformers checkpoints and lm-evaluation-harness."""

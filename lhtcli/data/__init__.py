"""Corpora, tokenizer, MLM masking and batching (DESIGN.md section 7)."""

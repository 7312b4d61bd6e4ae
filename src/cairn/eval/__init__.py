"""Held-out metrics: loss, perplexity and bits per byte (`evaluate`)."""

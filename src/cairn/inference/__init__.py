"""Using a trained model: sampling and streaming (`generate`), the terminal chat (`chat`)."""

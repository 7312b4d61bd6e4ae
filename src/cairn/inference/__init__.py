"""Using a trained model: how to sample (`sampling`: every setting, its default and allowed values),
sampling and streaming (`generate`), the terminal chat (`chat`)."""

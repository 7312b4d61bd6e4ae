"""What a label says besides a token id: no torch, so data workers and the model share it."""

IGNORE_INDEX = -100  # a label with this value is no target: padding, context-only tokens (torch's convention)

"""`cairn bench`: step speed against reference implementations."""

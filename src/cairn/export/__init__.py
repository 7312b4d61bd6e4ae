"""Writing a run in other tools' formats (Hugging Face `transformers`)."""

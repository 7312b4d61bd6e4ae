"""Writing a run in other tools' formats (Hugging Face `transformers`; GGUF for llama.cpp and Ollama)."""

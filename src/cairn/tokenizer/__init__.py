"""Tokenizers: the interface, GPT-2 and own byte-level BPEs (`base`), learning a BPE (`learn`), the
chat template (`chat_template`).
"""

"""Checkpoints: the on-disk format and atomic writes (`store`), checking one before loading (`verify`),
loading a run for use (`load`). Never imports training.
"""

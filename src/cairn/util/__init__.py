"""The bottom layer: errors, atomic files, JSON Lines input, the host's cores and CPU, logging, storage
failures in words. No torch.
"""

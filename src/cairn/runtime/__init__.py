"""Where and how a run computes: device, threads, seeding, autocast, free memory (`device`), and the
precision chosen by measurement (`precision`).
"""

"""Batch jobs over the encoder library: corpus encoding and hard-negative mining.

Ray is imported inside the functions that start Ray Data work, so the configs, the shard
format and the corpus reader load without it.
"""

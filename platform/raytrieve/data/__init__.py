"""Datasets for training and encoding: reading, validation before any cluster work, and
(next) the Ray Data stages that feed Ray Train."""

"""One error hierarchy for raytrieve.

Every message names the thing that is wrong (a field, a column, a file, a module) and how
to fix it. Catch ``RaytrieveError`` to catch them all.
"""

from __future__ import annotations


class RaytrieveError(Exception):
    """Base class of every error raytrieve raises on purpose."""


class ConfigError(RaytrieveError, ValueError):
    """A configuration value or key is wrong."""


class ModelLoadError(RaytrieveError, OSError):
    """A model directory is missing, incomplete or of a kind we cannot read."""


class UnknownModuleError(ModelLoadError):
    """modules.json names a module type raytrieve does not implement."""


class DimensionMismatchError(RaytrieveError, ValueError):
    """Two modules (or a module and its weights) disagree on a dimension."""


class InputError(RaytrieveError, ValueError):
    """Bad input to an encode / predict call (unknown prompt, wrong type, ...)."""


class AssetError(RaytrieveError, LookupError):
    """A shipped pretrained model cannot be found or converted."""


class DataError(RaytrieveError, ValueError):
    """A dataset file or column is missing, empty or of the wrong type."""

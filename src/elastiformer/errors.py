"""Errors a user can act on. Every one carries a one-line message that names the problem and the fix.

The CLI prints `error: <message>` and exits 2 for these; anything else is a bug and keeps its traceback.
"""


class ElastiformerError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in elastiformer."""


class ModelLoadError(ElastiformerError):
    """The model could not be found, downloaded or loaded, or its architecture is not supported."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's family has no architecture spec in `elastiformer.arch`."""


class ConfigError(ElastiformerError, ValueError):
    """An ElasticConfig / option value is out of range or unknown."""


class BudgetError(ConfigError):
    """A budget is outside (0, 1], names an unknown component, or is below what the dense layers need."""


class NotCalibratedError(ElastiformerError):
    """A causal model was asked to route tokens at inference before `calibrate()` fitted its thresholds."""


class RouterFileError(ElastiformerError):
    """A saved router folder is missing, corrupt, or belongs to another base model."""


class DataError(ElastiformerError):
    """Training / evaluation data is missing, empty, unreadable or too short."""

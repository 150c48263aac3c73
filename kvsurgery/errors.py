"""Errors kvsurgery raises. Every message names the problem and how to fix it."""

from __future__ import annotations


class KVSurgeryError(Exception):
    """Base class of every error raised by kvsurgery."""


class RecipeError(KVSurgeryError, ValueError):
    """A recipe string or its options are malformed, unknown, incomplete or incompatible."""


class BudgetError(KVSurgeryError, ValueError):
    """A budget cannot be honoured (non-positive, below sinks + window, ...)."""


class UnsupportedModelError(KVSurgeryError, TypeError):
    """The model has no attention site kvsurgery can rewrite, or a layout it does not handle."""


class CalibrationError(KVSurgeryError, ValueError):
    """A calibration artefact is missing, corrupt, or belongs to another model."""


class CacheCapacityError(KVSurgeryError, RuntimeError):
    """The fixed-capacity compressed cache has no room for the tokens being added."""


class SurgeryNotAppliedError(KVSurgeryError, RuntimeError):
    """An attention site ran without the kvsurgery rewrite (e.g. Dynamo was disabled)."""

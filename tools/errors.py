"""Errors a clinician can act on.

Every exception raised for bad input derives from :class:`RadAssistError` and carries a message
written for the person at the workstation (what was wrong, what to do), never a traceback.
"""
from __future__ import annotations


class RadAssistError(Exception):
    """Base class: the message is shown to the user as is."""


class StudyError(RadAssistError):
    """A study could not be read or is not usable (bad file, empty series, mixed patients...)."""


class UnsupportedError(RadAssistError):
    """The request is valid but not supported for this input (e.g. this modality) yet."""


class ToolError(RadAssistError):
    """A tool agent could not complete its work on valid input."""


class ConfigError(RadAssistError):
    """The configuration (models, servers, files) is wrong or incomplete."""

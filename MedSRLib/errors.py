"""Exceptions raised by MedSRLib.

`InputError` covers everything the caller can fix (bad file, bad argument, unknown model);
the CLI maps it to exit status 2. Anything else is an internal error (exit status 1).
"""


class MedSRError(Exception):
    """Base class of all MedSRLib errors."""


class InputError(MedSRError, ValueError):
    """The input (file, volume, argument or model choice) cannot be processed as asked."""


class WeightsError(InputError):
    """A weights file or its model card is missing, corrupt or does not match the architecture."""


class CancelledError(MedSRError):
    """The run was cancelled through its cancel token; nothing was written."""

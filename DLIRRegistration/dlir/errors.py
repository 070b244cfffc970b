"""Exceptions whose message is one sentence a user can act on (the CLI and the GUI show it as is)."""


class DLIRError(Exception):
    """Base class of every error the engine reports to a user."""


class InputError(DLIRError):
    """An input image, label map, mask or landmark file cannot be used."""


class StackError(DLIRError):
    """A stage-stack file or recipe is missing, corrupt or not meant for this task."""


class OutputError(DLIRError):
    """An output folder cannot be used, or its files cannot be written."""


class DeviceError(DLIRError):
    """The requested compute device is unavailable or ran out of memory."""


class CancelledError(DLIRError):
    """The user cancelled a running registration."""

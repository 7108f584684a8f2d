"""Typed errors. The library raises these and never exits; the CLI maps each to one exit code."""


class MixformerDeployError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1


class UsageError(MixformerDeployError):
    """A value the user gave does not make sense (e.g. an input side that is not a multiple of 32)."""

    exit_code = 2


class MissingBackendError(MixformerDeployError):
    """A backend, runtime or piece of hardware is needed but not available here."""

    exit_code = 3


class DeviceToolError(MixformerDeployError):
    """A benchmark tool ran on a device (a phone) but failed or printed nothing we can read."""

    exit_code = 5


class InputFileError(MixformerDeployError):
    """A file given to us (image, dataset, artifact) is missing, unreadable, corrupt or does not fit."""

    exit_code = 4


class CheckpointError(InputFileError):
    """A checkpoint is missing, unreadable, unsafe, corrupt or does not fit the model."""


class ArtifactError(InputFileError):
    """An exported artifact is missing, corrupt, or its metadata does not fit the weights."""


class ExportError(MixformerDeployError):
    """A converter failed while producing an artifact."""

    exit_code = 5


class RewriteError(ExportError):
    """A deploy-form rewrite pass found nothing to rewrite or changed the function."""


class InternalError(MixformerDeployError):
    """A bug: an exception nobody meant to raise (e.g. inside a benchmark worker). Never exit 1, which CI
    reads as "the artifact is wrong"."""

    exit_code = 70


class GateError(MixformerDeployError):
    """A gate (parity, accuracy, latency regression) failed."""

    exit_code = 1


class ParityError(GateError):
    """An artifact does not compute the reference function within tolerance."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line of at most ``limit`` characters: 'Type: message' with whitespace folded.
    The one helper for every error message that quotes a converter or runtime."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:limit] if text else type(e).__name__

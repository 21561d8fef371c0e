"""The errors a user can act on: bad input, bad config, a refused decision, a damaged artifact.

Every one of them carries a message that names the file, field or argument and says what to do. The CLI
prints such an error as one line and exits with code 2 (no traceback unless `--debug` or FLYWHEEL_DEBUG=1);
a Dagster step fails with the same message as its failure description, and a workload exits with
EX_CONFIG (78) so that the step is not retried. Anything else is a bug and keeps its traceback.

Standard library only: imported by the core, the workloads and the Dagster layer alike.
"""

from __future__ import annotations


class FlywheelError(Exception):
    """An expected failure with a message meant for the user (what is wrong, where, and what to do)."""


class ConfigError(FlywheelError, ValueError):
    """A config value that cannot be used; the message names its source (file and key, or the --set argument)."""


class DataError(FlywheelError, ValueError):
    """Input data that cannot be used: the message names the file (and the episode, column or timestamp)."""


class IngestError(DataError):
    """Input that cannot be ingested; the message names the file and the problem, and what to do."""


class NotFound(DataError, LookupError):
    """Something a command or config names that does not exist (a registry version, a champion); the message
    says what to list or do instead. Also a LookupError, for callers that look things up."""


class DecisionRefused(FlywheelError):
    """A decision the flywheel refused (a gate, a promotion, a rollback, a fit check); the message gives the
    failing criteria with their measured values and thresholds."""


class IntegrityError(FlywheelError):
    """An artifact whose files no longer match what was written (the message names the file)."""


def is_expected(exc: BaseException) -> bool:
    """Whether `exc` is one of the errors above (printed as a message), rather than a bug (a traceback)."""
    return isinstance(exc, FlywheelError)

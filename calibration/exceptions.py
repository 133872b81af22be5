"""The exitwise error hierarchy.

Every error a caller can hit derives from one root, so the CLI and the API can map each
kind to an exit code and an HTTP status in one place::

    ExitwiseError
    ├── InputError(ValueError)            bad logs, cards, options        CLI 2 / HTTP 422
    │   ├── LogFormatError                a log file that cannot be read  CLI 2 / HTTP 422
    │   └── CardError                     a model card that is wrong      CLI 2 / HTTP 422
    ├── NotFittedError(AttributeError)    estimator used before ``fit``   CLI 1 / HTTP 500
    ├── CalibrationError(RuntimeError)    optimiser failed                CLI 1 / HTTP 422
    ├── SolverError(RuntimeError)         no policy could be solved       CLI 1 / HTTP 422
    ├── MissingDependency(ImportError)    an optional extra not installed CLI 1 / HTTP 501
    └── PolicyError                       (policies/) domain errors, see policies.errors

``exit_code`` and ``http_status`` are class attributes, read by the interfaces.
"""

from __future__ import annotations


class ExitwiseError(Exception):
    """Root of every error exitwise raises on purpose."""

    exit_code: int = 1
    http_status: int = 500
    title: str = "exitwise error"


class InputError(ExitwiseError, ValueError):
    """Input that cannot be used: names what is wrong and where."""

    exit_code = 2
    http_status = 422
    title = "Invalid input"


class LogFormatError(InputError):
    """An exit-log file is malformed (names the file, row or column, and the cause)."""

    title = "Invalid exit logs"


class CardError(InputError):
    """A model card is malformed or contradicts its logs."""

    title = "Invalid model card"


class NotFittedError(ExitwiseError, AttributeError):
    """An estimator was used before ``fit``."""

    title = "Estimator not fitted"


class CalibrationError(ExitwiseError, RuntimeError):
    """A calibrator could not be fitted (the optimiser's message is quoted)."""

    http_status = 422
    title = "Calibration failed"


class SolverError(ExitwiseError, RuntimeError):
    """The threshold solver could not produce a policy."""

    http_status = 422
    title = "Solver failed"


class MissingDependency(ExitwiseError, ImportError):
    """A feature needs an optional extra that is not installed (names the extra to install)."""

    http_status = 501
    title = "Optional dependency not installed"

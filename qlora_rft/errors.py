"""Errors that mean "the user must change something": the CLI prints them on one line, no traceback."""


class UserError(Exception):
    """Bad input from the user (config, paths, data); the message says what to do."""


class ConfigError(UserError):
    """A config field or a rule between fields is wrong."""


class DataError(UserError):
    """A dataset, image or annotation cannot be used as given."""


class OutputError(UserError):
    """An output folder cannot be written as asked: in use by another run, not writable, or out of space."""


class TrainingError(UserError):
    """Training cannot go on as configured, e.g. a loss or gradient that is not finite."""


class RewardError(UserError):
    """A reward function failed on a row: it raised, or returned the wrong number of values or a value that is not a
    finite number."""

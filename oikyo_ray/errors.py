"""User-facing errors: each says what is wrong (file, row, field or flag) and what to do."""


class OikyoError(Exception):
    """An error caused by user input; the CLI prints it without a traceback and exits 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class ConfigError(OikyoError):
    """The config (YAML, overrides or values) is invalid; raised before Ray starts."""


class DataError(OikyoError):
    """A data source is missing, unreadable or yields no usable rows."""


class ModelError(OikyoError):
    """A model or tokenizer cannot be found or loaded."""


class RegistryError(OikyoError):
    """A registry name, reference, run or log entry is wrong."""


class RegistryConflict(RegistryError):
    """Another writer changed what this change depended on; nothing was written."""


class DeployRefused(OikyoError):
    """A deploy's eval gates or staging budgets were not met; nothing was promoted (exit 1)."""

    exit_code = 1

"""Errors that reach the user as one clear line and exit code 2."""


class ConfigError(Exception):
    """Bad input: a config value, an override, a file or a run folder that cannot be used."""

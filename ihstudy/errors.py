"""Errors that reach the user as one clear line and exit code 2 (every one derives from UserError)."""


class UserError(Exception):
    """Something the user can fix; the command line prints its message alone and exits with code 2."""


class ConfigError(UserError):
    """Bad input: a config value, an override, a feature file or a run folder that cannot be used."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, fails its checksum or does not load without running code."""


class RunInUseError(UserError):
    """Another ihstudy process holds the lock of the run (or sweep) folder."""

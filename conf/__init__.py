"""ihstudy's Hydra config tree; a wheel installs it as the package ihstudy.conf (see pyproject.toml)."""

"""The user commands: the `flamingo-*` entry points (pyproject.toml), thin over the package."""

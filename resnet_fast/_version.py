"""The package version: read by pyproject.toml at build time and by ``resnet_fast.__version__``."""

__version__ = "0.1.0"

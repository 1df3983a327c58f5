"""lllmsd: a local-model daemon that speaks the OpenAI API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lllmsd")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

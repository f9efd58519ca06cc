"""moe-watch: a per-node agent that watches Mixture-of-Experts LLM serving."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moe-watch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]

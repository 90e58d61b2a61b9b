"""C3AE age estimation (Zhang et al., CVPR 2019) across its whole life cycle on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("c3ae-ray")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

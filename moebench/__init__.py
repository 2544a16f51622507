"""moebench: dense, MoE, STGC and RoE vision-language models trained and measured side by side."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moebench")  # pyproject.toml's, as installed (editable or not)
except PackageNotFoundError:  # the source tree on sys.path without an install
    __version__ = "0+unknown"

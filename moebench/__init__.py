"""moebench: dense, MoE, STGC and RoE vision-language models trained and measured side by side."""

__version__ = "0.1.0"

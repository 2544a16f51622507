"""`python -m moebench` (what `torchrun -m moebench` starts in every process): the `moebench` command."""

from moebench.cli import main

main()

"""`python -m ffnfusion.cli` (how torchrun launches a verb)."""

from ffnfusion.cli import main

main()

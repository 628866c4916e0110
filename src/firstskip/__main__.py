"""`python -m firstskip` is the `firstskip` command."""

from firstskip.cli import main

main()

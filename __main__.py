"""`python -m saekit`: the `saekit` command."""

from .scripts.cli import main

main()

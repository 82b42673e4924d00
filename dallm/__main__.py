"""`python -m dallm`: the command table is dallm.cli."""

from dallm.cli import main

main()

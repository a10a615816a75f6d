"""`python -m deformable_detr COMMAND ...`: the commands (cli.py's `main`)."""

from .cli import main

main()

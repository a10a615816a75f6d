"""`python -m deformable_detr COMMAND ...`: the commands (cli.py's `main`)."""

from .apps.cli import main

main()

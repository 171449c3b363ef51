"""``python -m coe``: the command line (the ``coe`` script)."""

from coe.apps.cli import main

main()

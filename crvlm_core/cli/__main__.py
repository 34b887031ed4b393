"""`python -m crvlm_core.cli.main` runs the `crvlm` command."""
from crvlm_core.cli.main import main

main()

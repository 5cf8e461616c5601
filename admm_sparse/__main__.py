"""`python -m admm_sparse` is the `admm-sparse` command."""
import sys

from .cli import main

sys.exit(main())

"""`python -m bigbatch` runs the command-line interface (also under torchrun)."""

from bigbatch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

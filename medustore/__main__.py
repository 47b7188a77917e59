"""``python -m medustore``: the same command line as the ``medustore`` script."""

from medustore.cli import main

if __name__ == "__main__":
    main(prog_name="medustore")

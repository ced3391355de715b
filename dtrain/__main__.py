"""`python -m dtrain`: train (see dtrain/cli.py; `--help` lists the config groups and keys)."""

from dtrain.cli import main

if __name__ == "__main__":
    main()

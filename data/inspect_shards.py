"""Inspect Kontext shards: counts per task, size histogram, picture grid.

    python data/inspect_shards.py --help

Logic: kontext/data/commands.py.
"""

from kontext.cli import run_main
from kontext.data.commands import inspect_main

if __name__ == "__main__":
    run_main(inspect_main)

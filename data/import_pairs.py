"""Import a folder of image pairs or a JSONL manifest into Kontext shards.

    python data/import_pairs.py --help

Logic: kontext/data/commands.py.
"""

from kontext.cli import run_main
from kontext.data.commands import import_main

if __name__ == "__main__":
    run_main(import_main)

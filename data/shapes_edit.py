"""Write Shapes-Edit shards (the embedded dataset, spec v1).

    python data/shapes_edit.py --help

Logic: kontext/data/commands.py.
"""

from kontext.cli import run_main
from kontext.data.commands import shapes_edit_main

if __name__ == "__main__":
    run_main(shapes_edit_main)

"""Write the real-photo edit set (photos from inside scikit-image, edits with exact answers) as a metadata.csv.

    python data/photo_edits.py --help

Logic: kontext/data/photo_edits.py, kontext/data/commands.py.
"""

from kontext.cli import run_main
from kontext.data.commands import photo_edits_main

if __name__ == "__main__":
    run_main(photo_edits_main)

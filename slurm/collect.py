"""One markdown table of the final metrics of every finished run under a directory:

    python slurm/collect.py outputs/train > results.md
"""

from kontext.sweep import main

if __name__ == "__main__":
    main()

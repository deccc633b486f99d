"""Encode image shards once into a feature cache (autoencoder latents + text features).

    python data/cache_features.py out=data/cache/shapes_edit shards=data/shapes_edit/train

Logic: kontext/data/cache.py.
"""

from kontext.cli import run_main
from kontext.data.cache import cache_main

if __name__ == "__main__":
    run_main(cache_main)

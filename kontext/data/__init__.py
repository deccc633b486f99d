"""Kontext data: the shard format (`format`), writers (`writers`), importers (`importers`),
inspection (`inspect`), aspect-ratio buckets (`buckets`), the per-worker stream (`stream`) and
the streaming loader with its LightningDataModule (`loader`)."""

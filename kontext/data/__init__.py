"""Kontext data: the shard format (`format`), writers (`writers`), importers (`importers`, and
`tables` for CSV, Parquet and datasets folders), inspection (`inspect`), aspect-ratio buckets
(`buckets`), the per-worker stream (`stream`) and the streaming loader with its
LightningDataModule (`loader`)."""

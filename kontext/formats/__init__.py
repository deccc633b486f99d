"""Weights on disk: safetensors I/O, per-rank rows, training checkpoints, exports, the
diffusers layout, LoRA adapter files and the parts of a sampling pipeline."""

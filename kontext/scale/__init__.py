"""Many devices and clusters: FSDP2, activation checkpointing and compile per block; SLURM preemption."""

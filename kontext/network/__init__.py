"""The FLUX.1 transformer: its layers and attention, Kontext token packing, LoRA adapters and
the LADD discriminator heads."""

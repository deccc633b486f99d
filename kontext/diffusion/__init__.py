"""The rectified-flow objective, the sampler and the math of distillation, as plain functions."""

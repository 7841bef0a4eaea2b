"""The DeepSpeed training engine: config filling, the loop, checkpoints, export, metrics."""

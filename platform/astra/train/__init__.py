"""Training: the flow-matching objective (here), and later the Ray Train loop, FSDP2 and checkpoints."""

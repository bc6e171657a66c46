"""The supervised engine (one loop), checkpoints, guards, metrics, losses, attention, the fast path, batches."""

"""The only place that calls from_pretrained: dtype, attention, 4/8-bit, adapters, reward heads, merge."""

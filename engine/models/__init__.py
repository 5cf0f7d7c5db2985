"""Model description, weight stores and loaders, and the op-by-op emulated transformer with its fp32 reference."""

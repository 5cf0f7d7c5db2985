"""Emulation engine: Wormhole number formats, math fidelity, Llama-family models, accuracy and speed."""

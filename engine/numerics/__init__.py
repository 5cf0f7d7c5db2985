"""The bits: block-float quantization and packing, fidelity-phase matmuls, SFPU functions, the bf16-dest kernel."""

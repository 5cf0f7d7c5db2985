"""What a study file can name, torch-free: number formats, fidelity settings, the config grammar, devices."""

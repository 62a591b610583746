"""Function-preserving transforms applied before quantization: smoothing, rotations."""

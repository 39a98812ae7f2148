"""Quantization: march profiles, the PT2E quantizer, calibration, QAT and integer conversion."""

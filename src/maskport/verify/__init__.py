"""Comparing masks before and after conversion/quantization, and against ground truth."""

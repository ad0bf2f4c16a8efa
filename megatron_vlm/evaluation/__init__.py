"""Evaluation harness: benchmark metrics computed exactly as the official reference code computes them."""

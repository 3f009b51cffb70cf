"""Calibration data and forward loops through Megatron's pipeline schedule."""

"""Timing tactics on the device and the timing cache."""

"""Helpers every layer above the model may use: atomic file writing, devices, drawing, console output, message
text, local paths, timing."""

"""The bottom layer: exceptions, parameter checks, atomic file output and progress bars.
Imports nothing of neurotap but the native module."""

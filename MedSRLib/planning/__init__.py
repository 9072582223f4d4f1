"""What a run will do before it runs: scale and axis, the model for the input, the output
grid and whether it fits in memory.

May import: io, runtime, models, transforms, errors.
"""

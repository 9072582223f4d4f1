"""Array and image operations with no model and no file: output grids (geometry),
intensity mappings to network units, and the degradations that make LR from HR.

May import: errors only.
"""

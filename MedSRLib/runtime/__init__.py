"""How a network runs fast: the slice engine (axes, batches, tiles, precision, cancel),
the OpenVINO and int8 backends, the model cache and the memory budget. Arrays in,
arrays out: nothing here reads or writes volume files.

May import: models, transforms, errors.
"""

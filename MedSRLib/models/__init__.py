"""What a model is: the registry of names (`registry`), its entries (`catalog`), the
networks (`networks/`, tensors in, tensors out) and the shipped weights with their
cards (`weights/`).

May import: transforms, errors. `networks/` imports nothing of MedSRLib but itself.
"""

"""What a model is: the registry of names (`registry`), its entries (`catalog`), the
networks (`networks/`, tensors in, tensors out), the shipped weights with their
cards (`weights/`) and the one default-model rule (`default_rule`, torch-free, shared by the
registry and the card table).

May import: transforms, errors. `networks/` imports nothing of MedSRLib but itself.
"""

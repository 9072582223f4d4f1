"""Network definitions: tensors in, tensors out. Nothing here knows about files or volumes."""

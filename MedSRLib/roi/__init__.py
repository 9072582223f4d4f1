"""Lesion focus: the lesion localiser (segmenter ensemble, detector), ROI boxes, choosing the
model inside them and blending the ROI result into the whole-volume result.

May import: planning, io, runtime, models, transforms, errors.
"""

"""Through-plane super-resolution: thick slices to thin ones, any real factor, slice-profile aware.

- `profile.py`: the slice profile (box or Gaussian, thickness, gap) as matrices along one axis:
  the degradation a thick reconstruction applies, and cubic resampling to any grid.
- `network.py`: the small 2-D residual network that restores planes containing the slice axis.
- `planning.py`: turning `scale` / `target_spacing` / `slice_thickness` into an exact output grid.
- `apply.py`: running the network on a volume (coronal and sagittal planes, averaged).
- `adapt.py`: fine-tuning a copy of the network on the volume's own in-plane slices.
- `train.py`: the training recipe of the shipped weights.
"""

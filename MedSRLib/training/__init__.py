"""MedSR's own training: recipes (configs/*.yaml) -> trained, validated, exported models.

    python -m MedSRLib.training RECIPE_OR_CONFIG [--out DIR] [--resume]     # or: medsr train ...
    torchrun --nproc_per_node=N -m MedSRLib.training RECIPE_OR_CONFIG

Modules: `data` (MONAI datasets of volumes/PNGs -> foreground-aware random 2-D patches),
`degrade` (LR simulation, shared with the benchmarks), `losses`, `trainer` (loop, validation,
checkpoints, export), `checkpoint`, `distributed` (torchrun/DDP), `config`.
"""

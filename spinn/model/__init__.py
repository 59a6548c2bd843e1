"""The model (DESIGN.md parts 1 and 2): the backbones, the progressive generator that cuts
one into stages with early exits, the exit rule, checkpoints, stage-by-stage inference and
the model's zstd dictionary file."""

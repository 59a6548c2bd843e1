"""The offline part (DESIGN.md part 3): data sets, training, the threshold sweep, offline
profiling and the training of the zstd dictionaries."""

"""Data-parallel training: process groups and the DDP wrapper (`distributed`), and the statistics of the global
batch that batch-normalised losses and batch-level selections use inside a data-parallel step (`global_batch`)."""

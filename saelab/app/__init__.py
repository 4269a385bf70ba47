"""Everything Hydra: the `saelab` commands, the config schemas in the ConfigStore, the train / eval / harvest /
inspect jobs, sweeps and SLURM launch callbacks. The library packages below never import Hydra."""

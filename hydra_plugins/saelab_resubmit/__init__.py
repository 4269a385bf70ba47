"""The Hydra sweeper of `saelab sweep-resubmit` (Hydra loads sweepers only from the `hydra_plugins` namespace)."""

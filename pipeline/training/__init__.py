"""Training with PyTorch Lightning: the LightningModules, their data modules, the CLI and its run folders."""

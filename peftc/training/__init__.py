"""Stage 5, training: the LightningModule, fit, and reading datasets."""

"""Stage 5, training: the LightningModule around a PeftcModel, its callbacks, and fit."""

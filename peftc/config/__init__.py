"""Stage 1, the config: schema fields and typed specs, Hydra composition and its error translation,
config safety, and the registry that finds plug-ins by name. Imports nothing above it."""

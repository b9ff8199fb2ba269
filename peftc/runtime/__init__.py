"""Stage 3, the live model: executing a plan (materialize), the wrapped model and its adapter
lifecycle (merge, unload, disable)."""

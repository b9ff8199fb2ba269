"""Stage 6, the command line: preflight and Hydra entry, runs and actions, previews, diffs,
explanations, sweep summaries."""

"""What a run leaves in its output directory, by name (one place for every writer and reader)."""

PLAN_FILE = "plan.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CHECKPOINT_DIR = "checkpoints"

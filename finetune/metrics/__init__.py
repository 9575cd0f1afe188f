"""Console progress, metrics.jsonl, W&B, MFU and the end-of-run summary."""

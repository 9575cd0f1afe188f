"""What a run shows and records: the console, metrics.jsonl, trackers, MFU and the report.

- `monitor.RunMonitor`: the one object the run reports to (each step, evals, messages, the end).
- `display`, `banner`, `progress`: the console: live or plain step display, start and end
  blocks, progress of long preparation steps (`progress.task`).
- `writers`: metrics.jsonl; `summary`: summary.json's figures; `memory`: peak memory.
- `flops`: model FLOPs per step for MFU; `trackers`: W&B, TensorBoard and MLflow through
  accelerate; `report` and `compare`: report.png and `finetune report`.
"""

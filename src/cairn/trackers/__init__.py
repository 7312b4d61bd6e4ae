"""Where metrics go besides metrics.jsonl: TensorBoard, and plots of runs."""

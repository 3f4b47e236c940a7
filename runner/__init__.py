"""Worker-side execution: per-request state, the model runner, executors, parallel groups."""

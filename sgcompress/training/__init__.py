"""The training engine behind :mod:`sgcompress.finetune` (split into modules by concern)."""

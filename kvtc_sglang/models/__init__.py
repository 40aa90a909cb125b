"""Real models for calibration and evaluation: loading (smollm2), GGUF conversion (convert), KV capture (kv_capture)."""

"""Evaluation on a real model: accuracy protocol and baselines (accuracy, baselines), the CPU serving simulation
(chat_engine), conversation data sets (conversations), answer agreement (agreement) and result provenance
(provenance). Beside the cache: imports the codec, the models and sglang_compat, never the cache."""

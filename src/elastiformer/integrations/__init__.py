"""Bridges to other tools of the field. `lm_eval`: an lm-evaluation-harness model wrapper and a local task."""

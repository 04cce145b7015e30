"""Measuring an elastic model against its teacher: `lm` (ΔLM loss, KL, top-1 agreement, FLOPs, baselines at matched
FLOPs), `encoder` (embedding cosine and retrieval agreement), `vision` (image-classifier accuracy) and `timing`
(the one interleaved wall-clock timer and the machine record)."""

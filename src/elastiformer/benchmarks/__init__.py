"""The benchmarks behind `elastiformer bench`, `bench-speed`, `bench-vision` and `flextron bench`.

`runner` holds the loop and the parts every bench shares (per-setting saving, --append / --resume, the tally of
learned routing against its baselines, plots, README sections); `settings` what each ElastiFormer setting routes;
one module per task: `lm` (SmolLM2), `encoder` (MiniLM), `vision` (the ViT teacher), `speed` (wall-clock against
FLOPs, ElastiFormer beside Flextron) and `flextron` (Flextron's routers against its baselines). The library never
imports this package: benchmarks use the library, the CLI runs them.
"""

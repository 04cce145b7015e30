"""Training: `loop` (the one accelerate loop, shared by ElastiFormer and Flextron: optimizer, schedule, accumulation,
checkpoints, the NaN stop), `routers` (`train_routers`: what an ElastiFormer router-training step does, the target
phase, resume) and `vit_teacher` (the small ViT classifier trained here as the vision teacher)."""

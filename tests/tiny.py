"""The smallest real training set-up for tests: ViT-nano/4 on 16-px global and 8-px local
crops with 64-prototype heads, two 3-step "epochs", logging every step, no loader workers.
Tests append their own overrides (later ones win)."""

TINY = [
    "model.arch=vit_nano", "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
    "objective.dino_head.n_prototypes=64", "objective.ibot_head.n_prototypes=64",
    "objective.dino_head.hidden_dim=32", "objective.ibot_head.hidden_dim=32",
    "optim.epochs=2", "optim.epoch_length=3", "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1",
    "train.log_period=1", "data.num_workers=0",
]

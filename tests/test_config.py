import pytest

from dinoforge.config import Config, ConfigError, load_config, parse_override, preset_names, to_dict, build


def test_presets_load_and_match_official_recipes():
    assert {"smoke", "vits14", "vitb14", "vitl14", "vitg14"} <= set(preset_names())
    vitl = load_config("vitl14")
    assert (vitl.model.arch, vitl.model.patch_size, vitl.model.ffn_layer, vitl.model.drop_path_rate) == ("vit_large", 14, "swiglu", 0.4)
    assert (vitl.objective.dino_head.n_prototypes, vitl.objective.dino_head.bottleneck_dim) == (131072, 384)
    assert vitl.objective.separate_ibot_head and vitl.objective.centering == "sinkhorn_knopp"
    assert (vitl.optim.base_lr, vitl.optim.epochs, vitl.optim.warmup_epochs, vitl.optim.weight_decay_end) == (2e-4, 500, 80, 0.2)
    assert (vitl.crops.global_crops_size, vitl.crops.local_crops_size, vitl.crops.local_crops_number) == (224, 98, 8)
    assert vitl.teacher.momentum_teacher == 0.994 and vitl.train.batch_size_per_gpu == 32
    vitg = load_config("vitg14")
    assert vitg.model.arch == "vit_giant2" and vitg.train.batch_size_per_gpu == 12
    default = Config()  # official ssl_default_config.yaml
    assert (default.optim.base_lr, default.optim.layerwise_decay, default.optim.patch_embed_lr_mult) == (0.004, 0.9, 0.2)
    assert (default.objective.koleo_loss_weight, default.objective.mask_ratio_min_max) == (0.1, (0.1, 0.5))
    assert (default.teacher.warmup_teacher_temp, default.teacher.teacher_temp, default.optim.weight_decay) == (0.04, 0.07, 0.04)


def test_overrides_are_typed_and_nested():
    cfg = load_config("smoke", ["optim.base_lr=1e-3", "crops.local_crops_scale=[0.1, 0.3]", "model.img_size=null", "train.seed=7"])
    assert cfg.optim.base_lr == 1e-3 and isinstance(cfg.optim.base_lr, float)
    assert cfg.crops.local_crops_scale == (0.1, 0.3)
    assert cfg.model.img_size is None and cfg.train.seed == 7
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("nope.x=1", "unknown config key 'nope'"),
        ("optim.base_lr=fast", "'optim.base_lr' expects float"),
        ("train.batch_size_per_gpu=2.5", "'train.batch_size_per_gpu' expects int"),
        ("crops.global_crops_scale=[0.3]", "'crops.global_crops_scale' must be a list of 2"),
        ("objective.centering=median", "objective"),
        ("optim.warmup_epochs=1000", "warmup_epochs"),
        ("optim", "KEY=VALUE"),
        ("model.arch=vit_colossal", "unknown arch 'vit_colossal'"),
        ("model.ffn_layer=gelu", "ffn_layer must be one of"),
        ("distill.teacher_arch=vit_nano", "DINOv2 released no vit_nano weights"),
    ],
)
def test_invalid_config_fails_fast_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config("smoke", [override])


def test_round_trip_through_plain_data():
    cfg = load_config("vitl14", ["train.seed=3"])
    assert build(Config, to_dict(cfg)) == cfg


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="unknown preset 'vitx'"):
        load_config("vitx")

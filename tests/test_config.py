import dataclasses
import json
from pathlib import Path

import pytest

from jaxtl.config import RECIPES, TrainConfig, build_parser, config_from_args
from jaxtl.train import main


@pytest.mark.parametrize("argv,message", [
    (["--image-size", "16"], "--image-size must be at least 32"),
    (["--mode", "scratch", "--weights", "x.h5"], "--mode scratch trains from random init"),
    (["--test-size", "1.5"], "--test-size must be between 0 and 1"),
    (["--head", "lda"], "--mode auto (the jaxtl recipe's default) picks the head itself"),
    (["--mode", "frozen", "--head", "lda", "--hidden", "256"], "--head lda is a linear head fitted on"),
    (["--mode", "frozen", "--head", "lda", "--mixup", "0.2"], "no in-step augmentation or --mixup"),
    (["--vtlp", "0.1"], "--vtlp warps offline copies: give --augment-copies N too"),
    (["--augment-copies", "1", "--vtlp", "0.1", "--representation", "mfcc"], "--vtlp warps mel bands"),
    (["--mode", "frozen", "--head", "lda", "--ensemble", "2", "--weights", "x.h5"], "trains identical members"),
    (["--ensemble", "2"], "trains identical members"),  # --mode auto's LDA on the default (ImageNet) base
    (["--ensemble", "0"], "--ensemble must be at least 1"),
])
def test_bad_flags_give_one_line_errors(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_unknown_choice_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--mode", "sideways"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_help_documents_every_setting():
    text = " ".join(build_parser().format_help().split())
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "seed recipe: 10)" in text and "(default: 32)" in text and "(default: 0.001)" in text


SEED_SETTINGS = {  # the Keras recipe as written
    "representation": "mfcc", "sample_rate": 22050, "n_mfcc": 13, "n_fft": 2048, "hop_length": 512, "n_mels": 128,
    "image_size": 224, "fit": "pad", "preprocess": "unit", "mode": "frozen", "taps": "5", "pooling": "flatten",
    "hidden": 256, "dropout": 0.0, "normalize": False, "epochs": 10, "batch_size": 32, "lr": 1e-3,
    "base_lr": 1e-5, "val_size": 0.2, "test_size": 0.2, "split": "stratified", "seed": 42, "patience": 3,
    "plateau_patience": 2, "plateau_factor": 0.5, "finetune_convs": 3, "weight_decay": 0.0,
}


def test_recipe_seed_reproduces_the_seed_settings(tmp_path):
    cfg = config_from_args(["--recipe", "seed"])
    assert cfg.recipe == "seed"
    assert {k: getattr(cfg, k) for k in SEED_SETTINGS} == SEED_SETTINGS
    assert config_from_args(["--recipe", "seed", "--epochs", "3"]).epochs == 3


def test_default_recipe_is_jaxtl_and_flags_override_it():
    cfg = config_from_args([])
    assert cfg.recipe == "jaxtl" and cfg.normalize and cfg.taps == "3,4" and cfg.image_size == 64
    assert {k: getattr(cfg, k) for k in RECIPES["jaxtl"]} == RECIPES["jaxtl"]
    assert config_from_args(["--no-normalize", "--taps", "5"]).normalize is False


def test_resume_takes_the_saved_config_and_only_the_flags_given(cfg, tmp_path):
    Path(cfg.out).mkdir(parents=True)
    Path(cfg.out, "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    resumed = config_from_args(["--resume", "--out", cfg.out, "--epochs", "7"])
    assert resumed == dataclasses.replace(cfg, resume=True, epochs=7)


def test_a_jaxtl_0_1_config_still_loads(cfg):
    from jaxtl.config import load_config

    new_settings = ("verbose", "holdout_group", "checkpoint_every")
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in new_settings}
    assert load_config({**old, "progress": False}, "config.json").verbose == 0
    assert load_config({**old, "progress": True}, "config.json").verbose == 1


def test_a_jaxtl_0_2_band_norm_flag_still_loads(cfg):
    from jaxtl.config import load_config

    settings = dataclasses.asdict(cfg)
    assert load_config({**settings, "band_norm": True}, "config.json").band_norm == "mean"
    assert load_config({**settings, "band_norm": False}, "config.json").band_norm == "none"


def test_a_config_from_another_version_is_one_line(cfg, capsys):
    from jaxtl.evaluate import main as evaluate_main

    Path(cfg.out).mkdir(parents=True)
    Path(cfg.out, "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "warp_factor": 9}))
    assert main(["--resume", "--out", cfg.out]) == 2
    assert evaluate_main([cfg.out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("another jaxtl version (settings warp_factor are unknown" in e for e in err)


@pytest.mark.parametrize("taps,finetune_convs,k", [("5", 3, 10), ("3,4,5", 1, 12), ("3,4", 3, 7), ("2,3", 2, 5)])
def test_fine_tuning_unfreezes_the_last_convs_the_head_reads(taps, finetune_convs, k):
    for mode, ks in (("finetune", [k]), ("progressive", [13, k])):
        cfg = TrainConfig(taps=taps, mode=mode, finetune_convs=finetune_convs).validate()
        assert [s.split.k for s in cfg.stages()] == ks


def test_mode_auto_picks_the_row_measured_nearest_to_the_clips_per_class(monkeypatch):
    import jaxtl.config

    table = ((5, "frozen", "lda"), (50, "finetune", "dense"), (500, "scratch", "dense"))
    monkeypatch.setattr(jaxtl.config, "AUTO", table)
    cfg = TrainConfig.from_recipe("jaxtl", mode="auto", weights="random").validate()

    def choice(clips, c=cfg):
        chosen = c.resolve_auto(clips, 10)[0]
        return chosen.mode, chosen.head

    for measured, mode, head in table:
        assert choice(int(measured * 10)) == (mode, head)
        assert f"{measured:g} clips a class" in cfg.resolve_auto(int(measured * 10), 10)[1]
    for (low, *lower), (high, *upper) in zip(table, table[1:]):  # nearest on a log scale: the geometric midpoint
        middle = (low * high) ** 0.5 * 10
        assert choice(int(middle * 0.9)) == tuple(lower) and choice(int(middle * 1.1) + 1) == tuple(upper)
    given = dataclasses.replace(cfg, weights="weights.h5")  # a given weight file is never dropped for scratch
    assert choice(100_000, given) == ("finetune", "dense")
    mlp = dataclasses.replace(cfg, hidden=256)  # no closed-form head on an MLP head
    assert choice(50, mlp) == ("frozen", "dense")


def test_mode_auto_reads_the_backbones_own_table_and_says_when_it_has_none(monkeypatch):
    import jaxtl.config

    table = ((10, "frozen", "lda"), (100, "finetune", "dense"))
    monkeypatch.setattr(jaxtl.config, "AUTO_BACKBONES", {"efficientnet_lite0:pretrained": table})
    cfg = TrainConfig.from_recipe("jaxtl", mode="auto", backbone="efficientnet_lite0").validate()
    small, _ = cfg.resolve_auto(100, 10, pretrained=True)
    assert (small.mode, small.head, small.taps) == ("frozen", "lda", "3,4")
    whole, why = cfg.resolve_auto(1000, 10, pretrained=True)  # the whole base trains, as the study ran it
    assert {k: getattr(whole, k) for k in jaxtl.config.WHOLE_FINETUNE} == jaxtl.config.WHOLE_FINETUNE
    assert whole.stages()[0].split.k == 0 and "benchmarks/backbones.py" in why
    unmeasured, why = cfg.resolve_auto(1000, 10, pretrained=False)  # random Lite0: VGG16's table, said so
    assert (unmeasured.mode, unmeasured.head) == ("frozen", "lda")
    assert "efficientnet_lite0:random was not measured" in why


def test_the_auto_table_is_what_data_size_measured():
    from jaxtl.config import AUTO

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "data_size-jaxtl-cpu2.json"
    rows = [r for r in json.loads(results.read_text())["rows"] if r["weights"] == "HED"]
    assert sorted({r["n_train"] / 10 for r in rows}) == [measured for measured, _, _ in AUTO]
    for measured, mode, head in AUTO:
        best = max((r for r in rows if r["n_train"] / 10 == measured), key=lambda r: r["val_mean"])
        assert best["mode"] == mode + ("" if head == "dense" else f"+{head}")


def test_the_backbone_auto_tables_are_what_the_backbone_study_measured():
    from jaxtl.config import AUTO_BACKBONES

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    names = {"efficientnet_lite0:pretrained": {"lite0-imagenet-frozen": ("frozen", "lda"),
                                               "lite0-imagenet-whole": ("finetune", "dense")}}
    for key, table in AUTO_BACKBONES.items():
        for measured, mode, head in table:
            rows = json.loads((results / f"backbones-data-s64-n{int(measured * 10)}-cpu2.json").read_text())["rows"]
            best = max((r for r in rows if r["config"] in names[key]), key=lambda r: r["val_mean"])
            assert names[key][best["config"]] == (mode, head), (key, measured)

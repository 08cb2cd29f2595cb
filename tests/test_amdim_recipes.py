"""The official recipes (--recipe) and the official defaults of each method, pinned value by value
to the public code (the source of each value in the comments), and the trainer's resolved options:
explicit values override a recipe, the run prints them at its start and stores them in its checkpoint."""
import pytest

from amdim import checkpoint, train
from amdim.config import Config, resolve
from amdim.data.augment import POLICIES
from amdim.recipes import RECIPES

# amdim-public train.py defaults (--ndf 128 --n_rkhs 1024 --n_depth 3 --tclip 20 --use_bn 0
# --batch_size 200 --learning_rate 0.0002) and task_self_supervised.py (Adam betas (0.8, 0.999),
# weight_decay 1e-5, 500-update warm-up, MultiStepLR([250, 280], 0.2), 300 epochs for C10/C100/STL10)
AMDIM_SMALL = dict(ndf=128, n_rkhs=1024, n_depth=3, use_bn=False, tclip=20.0, reg_weight=0.05,
                   costs=["1t5", "1t7", "5t5"], estimator="nce", batch_size=200, lr=2e-4, betas=[0.8, 0.999],
                   weight_decay=1e-5, warmup_steps=500, lr_milestones=[250, 280], lr_decay=0.2, epochs=300)
# rdevon/DIM Controller/LocalDIM defaults (batch 64, lr 1e-4, mi_units 2048, JSD), configs/convnets.py
# (ndf 64), Controller output_units 64, cortex optimizer.py Adam betas (0.5, 0.999), no schedule
DIM_BASE = dict(ndf=64, y_dim=64, mi_units=2048, local_arch="dot", global_arch="dot", estimator="jsd",
                batch_size=64, lr=1e-4, betas=[0.5, 0.999], weight_decay=0.0, warmup_steps=0, lr_milestones=[])
OFFICIAL = {
    "amdim-cifar10": dict(AMDIM_SMALL, method="amdim", dataset="cifar10", image_size=32, augment="amdim-cifar"),
    "amdim-cifar100": dict(AMDIM_SMALL, method="amdim", dataset="cifar100", image_size=32, augment="amdim-cifar"),
    "amdim-stl10": dict(AMDIM_SMALL, method="amdim", dataset="stl10", image_size=64, augment="amdim-stl"),
    # amdim-public README: --ndf 192 --n_rkhs 1536 --batch_size 480 --tclip 20.0 --n_depth 8 --dataset IN128
    # --amp; task_self_supervised.py: milestones [30, 45], 50 epochs
    "amdim-imagenet": dict(AMDIM_SMALL, method="amdim", dataset="folder", image_size=128, ndf=192, n_rkhs=1536,
                           n_depth=8, batch_size=480, lr_milestones=[30, 45], epochs=50, augment="amdim-imagenet",
                           amp="auto"),
    # rdevon/DIM README: local classifier prior --d.source CIFAR10 --t.epochs 1000 --prior.scale 0.1
    "dim-cifar10": dict(DIM_BASE, method="dim", dataset="cifar10", image_size=32, alpha=0.0, beta=1.0, gamma=0.1,
                        prior="uniform", epochs=1000, augment="none"),
    # rdevon/DIM README: local classifier --d.sources STL10 --data_args.image_size 64 --t.epochs 200
    # --local.mode nce --local.mi_units 1024 (no prior)
    "dim-stl10": dict(DIM_BASE, method="dim", dataset="stl10", image_size=64, alpha=0.0, beta=1.0, gamma=0.0,
                      prior="none", estimator="nce", mi_units=1024, epochs=200, augment="dim-stl"),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_each_recipe_is_the_official_command(name):
    options = resolve({"recipe": name}).options()
    assert options["recipe"] == name
    assert {k: options[k] for k in OFFICIAL[name]} == OFFICIAL[name]


def test_the_recipes_are_the_pinned_ones():
    assert sorted(RECIPES) == sorted(OFFICIAL)


def test_official_augmentation_policies():
    # amdim-public datasets.py TransformsC10: RandomTranslateWithReflect(4) p 0.8, ColorJitter(0.4, 0.4,
    # 0.4, 0.2) p 0.8, RandomGrayscale(0.25), RandomHorizontalFlip(0.5) before both views
    c = POLICIES["amdim-cifar"]
    assert (c.crop, c.max_translate, c.p_translate, c.jitter, c.p_jitter, c.p_gray, c.p_flip) == (
        "translate", 4, 0.8, (0.4, 0.4, 0.4, 0.2), 0.8, 0.25, 0.5)
    # TransformsSTL10: RandomResizedCrop(64, (0.3, 1.0), (0.7, 1.4), INTERP 3 = bicubic); test Resize(70)
    s = POLICIES["amdim-stl"]
    assert (s.crop, s.scale, s.ratio, s.interpolation, s.jitter, s.p_jitter, s.p_gray, s.eval_resize) == (
        "resized", (0.3, 1.0), (0.7, 1.4), "bicubic", (0.4, 0.4, 0.4, 0.2), 0.8, 0.25, 70 / 64)
    # TransformsImageNet128: ColorJitter(0.4, 0.4, 0.4, 0.1); test Resize(146), CenterCrop(128)
    i = POLICIES["amdim-imagenet"]
    assert (i.crop, i.scale, i.ratio, i.jitter, i.eval_resize) == ("resized", (0.3, 1.0), (0.7, 1.4),
                                                                  (0.4, 0.4, 0.4, 0.1), 146 / 128)
    # cortex torchvision_datasets.py STL-10: RandomResizedCrop(64) (torchvision's scale and ratio),
    # RandomHorizontalFlip, no colour; test Resize(64)
    d = POLICIES["dim-stl"]
    assert (d.crop, d.scale, d.ratio, d.jitter, d.p_gray, d.p_flip, d.eval_resize) == (
        "resized", (0.08, 1.0), (3 / 4, 4 / 3), None, 0.0, 0.5, 1.0)
    n = POLICIES["none"]
    assert (n.crop, n.jitter, n.p_gray, n.p_flip) == ("none", None, 0.0, 0.0)


def test_method_defaults_are_the_official_method_at_a_cpu_size():
    a = resolve({}).options()
    # the method as amdim-public (costs.py, task_self_supervised.py, datasets.py); the size is the CPU one
    assert {k: a[k] for k in ("estimator", "costs", "tclip", "reg_weight", "lr", "betas", "weight_decay",
                              "warmup_steps", "lr_decay", "augment", "use_bn")} == dict(
        estimator="nce", costs=["1t5", "1t7", "5t5"], tclip=20.0, reg_weight=0.05, lr=2e-4, betas=[0.8, 0.999],
        weight_decay=1e-5, warmup_steps=500, lr_decay=0.2, augment="amdim-cifar", use_bn=False)
    d = resolve({"method": "dim"}).options()
    # rdevon/DIM: JSD, dot critics, DIM(L) with the uniform prior, Adam 1e-4 (0.5, 0.999), batch 64,
    # CIFAR read without augmentation
    assert {k: d[k] for k in ("estimator", "local_arch", "global_arch", "prior", "alpha", "beta", "gamma",
                              "lr", "betas", "weight_decay", "batch_size", "augment", "y_dim")} == dict(
        estimator="jsd", local_arch="dot", global_arch="dot", prior="uniform", alpha=0.0, beta=1.0, gamma=0.1,
        lr=1e-4, betas=[0.5, 0.999], weight_decay=0.0, batch_size=64, augment="none", y_dim=64)
    assert resolve({"method": "dim", "dataset": "stl10"}).data.augment == "dim-stl"
    assert resolve({"dataset": "stl10"}).data.augment == "amdim-stl"
    assert resolve({"dataset": "folder"}).data.augment == "amdim-imagenet"


def test_explicit_options_override_a_recipe():
    o = resolve({"recipe": "amdim-cifar10", "dataset": "shapes", "ndf": 8, "epochs": 2}).options()
    assert (o["dataset"], o["ndf"], o["epochs"], o["n_rkhs"], o["batch_size"]) == ("shapes", 8, 2, 1024, 200)
    assert o["lr_milestones"] == [250, 280]      # the recipe's, not rescaled to the explicit epochs
    # a preset given explicitly sets the weights over the recipe's; explicit weights win over both
    o = resolve({"recipe": "dim-cifar10", "dim_preset": "G"}).options()
    assert (o["alpha"], o["beta"], o["gamma"]) == (1.0, 0.0, 1.0)
    o = resolve({"recipe": "dim-cifar10", "dim_preset": "G", "gamma": 0.5}).options()
    assert (o["alpha"], o["beta"], o["gamma"]) == (1.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="--recipe dim-cifar10 is a --method dim recipe, got --method amdim"):
        resolve({"recipe": "dim-cifar10", "method": "amdim"})
    with pytest.raises(ValueError, match="--n-rkhs does not apply to --method dim"):
        resolve({"recipe": "dim-cifar10", "n_rkhs": 64})


def test_options_round_trip():
    for given in ({}, {"method": "dim"}, {"recipe": "amdim-stl10"}, {"recipe": "dim-stl10", "seed": 3}):
        cfg = resolve(given)
        assert Config.from_options(cfg.options()) == cfg


def test_a_run_prints_its_resolved_options_and_stores_them(tmp_path, capsys):
    args = train.build_parser().parse_args([
        "--recipe", "amdim-cifar10", "--dataset", "digits", "--ndf", "4", "--n-rkhs", "16", "--n-depth", "1",
        "--batch-size", "32", "--epochs", "1", "--steps-per-epoch", "1", "--no-eval", "--no-progress",
        "--out-dir", str(tmp_path / "run")])
    summary = train.run(args)
    err = capsys.readouterr().err
    first = err.splitlines()[:6]
    assert first[0] == "amdim.train: method=amdim recipe=amdim-cifar10, resolved options:"
    assert first[1].split() == ["data", "dataset=digits", "data_path=None", "image_size=32", "augment=amdim-cifar"]
    assert "n_rkhs=16" in first[2] and "tclip=20.0" in first[3] and "batch_size=32" in first[4]
    assert "lr_milestones=250,280" in first[4] and "warmup_steps=500" in first[4]
    ck = checkpoint.load(str(tmp_path / "run" / checkpoint.CHECKPOINT))
    assert ck["args"] == summary["config"].options()
    assert Config.from_options(ck["args"]) == summary["config"]

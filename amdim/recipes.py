"""The official recipes as presets of amdim.train (`--recipe NAME`): the command lines and defaults
of the public code, as options of this trainer. Explicit options override a recipe's; docs/
amdim_vs_official.md and docs/dim.md list where each value comes from and what differs.
"""
from __future__ import annotations

from .config import DIM_PRIOR_GP

# amdim-public train.py defaults (ndf 128, n_rkhs 1024, n_depth 3, tclip 20, use_bn 0, batch 200,
# lr 2e-4) and task_self_supervised.py (Adam betas (0.8, 0.999), weight decay 1e-5, the 500-update
# warm-up; CIFAR / STL-10: MultiStepLR([250, 280], 0.2), 300 epochs)
_AMDIM_SMALL = dict(method="amdim", ndf=128, n_rkhs=1024, n_depth=3, use_bn=False, tclip=20.0, reg_weight=0.05,
                    costs=("1t5", "1t7", "5t5"), estimator="nce", batch_size=200, lr=2e-4, betas=(0.8, 0.999),
                    weight_decay=1e-5, warmup_steps=500, lr_milestones=(250, 280), lr_decay=0.2, epochs=300)

# rdevon/DIM: the Controller's defaults (batch 64, lr 1e-4, basic32x32 / basic64x64 with ndf 64,
# output_units 64), cortex's Adam betas (0.5, 0.999), no schedule; LocalDIM's mi_units 2048, JSD
_DIM = dict(method="dim", ndf=64, y_dim=64, mi_units=2048, local_arch="dot", global_arch="dot", estimator="jsd",
            batch_size=64, lr=1e-4, betas=(0.5, 0.999), weight_decay=0.0, warmup_steps=0, lr_milestones=(),
            prior_gp=DIM_PRIOR_GP)

RECIPES = {
    # datasets.py: C10 -> 32 px encoder, TransformsC10
    "amdim-cifar10": dict(_AMDIM_SMALL, dataset="cifar10", image_size=32, augment="amdim-cifar"),
    "amdim-cifar100": dict(_AMDIM_SMALL, dataset="cifar100", image_size=32, augment="amdim-cifar"),
    # datasets.py: STL10 -> 64 px encoder, train+unlabeled, TransformsSTL10
    "amdim-stl10": dict(_AMDIM_SMALL, dataset="stl10", image_size=64, augment="amdim-stl"),
    # README: --ndf 192 --n_rkhs 1536 --batch_size 480 --tclip 20.0 --n_depth 8 --dataset IN128 --amp;
    # task_self_supervised.py: MultiStepLR([30, 45], 0.2), 50 epochs; datasets.py TransformsImageNet128
    # (an ImageNet directory of class folders: --dataset folder)
    "amdim-imagenet": dict(_AMDIM_SMALL, dataset="folder", image_size=128, ndf=192, n_rkhs=1536, n_depth=8,
                           batch_size=480, lr_milestones=(30, 45), epochs=50, augment="amdim-imagenet", amp="auto"),
    # README: `local classifier prior --d.source CIFAR10 --t.epochs 1000 --prior.scale 0.1` (the DIM
    # paper's DIM(L): alpha 0, beta 1, gamma 0.1; its first command drops the prior: --gamma 0 --prior
    # none); CIFAR-10 is read without augmentation
    "dim-cifar10": dict(_DIM, dataset="cifar10", image_size=32, alpha=0.0, beta=1.0, gamma=0.1, prior="uniform",
                        epochs=1000, augment="none"),
    # README: `local classifier --d.sources STL10 --data_args.image_size 64 --data_args.flip -n DIM_STL
    # --t.epochs 200 --encoder_config foldmultialex64x64 --local.mode nce --output_units 0
    # --local.mi_units 1024`: local NCE, no prior, 200 epochs; cortex's STL-10 crop and flip. The folded
    # AlexNet is not built here: the 64 px encoder is basic64x64, with a 64-unit Y
    "dim-stl10": dict(_DIM, dataset="stl10", image_size=64, alpha=0.0, beta=1.0, gamma=0.0, prior="none",
                      estimator="nce", mi_units=1024, epochs=200, augment="dim-stl"),
}

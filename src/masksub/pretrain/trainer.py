"""``masksub pretrain``: DMJD (or its single-view baseline) on the trainer's loop, data and checkpoints."""

from __future__ import annotations

from ..train import checkpoint
from ..train.build import build_model
from ..train.config import ConfigError
from ..train.data import build_loaders
from ..train.trainer import Trainer
from ..train.transforms import mean_std
from .model import DMJD


class PretrainTrainer(Trainer):
    """The classification trainer with a DMJD model: same config, data, DDP, checkpoints and resume.

    Writes ``encoder.pt`` (the plain timm encoder's state dict) next to ``last.pt``; it loads into
    ``masksub train --model.checkpoint`` for finetuning and into ``masksub linprobe``.
    """

    LOSS_KEYS = ("loss_masked", "loss_visible")
    command = "pretrain"
    evaluates = False  # judged by linear probe and finetuning: no evaluation split is read

    def _build(self, train_set, val_set) -> None:
        cfg = self.cfg
        encoder = build_model(cfg, num_classes=0, log=self.log, initial_weights=not self.resuming)
        mean, std = mean_std(cfg, encoder)
        try:
            net = self._dmjd(encoder, mean, std)
        except TypeError as e:  # not an encoder DMJD takes
            raise ConfigError(f"model.name={cfg.model.name}: {e}") from None
        except ValueError as e:  # views, corruption, prediction and block that cannot work together
            raise ConfigError(f"pretrain.views / corruption / prediction / block / target: {e}") from None
        self.net, self.model = net.to(self.device), encoder
        self._head_parameters = sum(q.numel() for q in net.parameters()) - sum(q.numel() for q in encoder.parameters())
        self.loaders = build_loaders(cfg, encoder, train_set, val_set, self.dist.rank, self.dist.world, self.device)
        self.ema, self.criterion = None, None  # DMJD returns its own losses

    def _dmjd(self, encoder, mean: tuple, std: tuple) -> DMJD:
        p = self.cfg.pretrain
        return DMJD(
            encoder,
            method=p.method,
            views=p.views,
            corruption=p.corruption,
            prediction=p.prediction,
            block=p.block,
            target=p.target,
            decoder_dim=p.decoder_dim,
            decoder_depth=p.decoder_depth,
            decoder_heads=p.decoder_heads,
            projector_dim=p.projector_dim,
            visible_weight=p.visible_weight,
            mean=mean,
            std=std,
        )

    def _learning_rate(self) -> float:
        """The adaptive rule: base_lr x images per step x (prediction / corruption) / 256."""
        cfg = self.cfg
        if cfg.optim.base_lr is None:
            return cfg.optim.lr
        images = cfg.data.batch_size * cfg.train.accum_steps * self.dist.world
        return self.net.adaptive_lr(cfg.optim.base_lr, images)

    def _evaluate(self) -> dict:
        return {}

    def _method(self) -> str:
        p, heads = self.cfg.pretrain, self._head_parameters
        target = {"hog": "HOG", "pixels": "pixel"}.get(p.target, p.target)
        return f" (encoder); {p.method} pretraining on {target} targets, decoder and heads {heads / 1e6:.2f}M"

    def _method_name(self) -> str:
        return self.cfg.pretrain.method  # dmjd or single: a pretraining run has no sub branch

    def _evaluated(self, images: int) -> str:
        return ""

    def fit(self) -> dict:
        result = super().fit()
        encoder = self._full_state(self.model)  # every process joins the gather under FSDP
        if self.dist.main:
            checkpoint.save_atomic(encoder, self.folder / "encoder.pt")
        return result

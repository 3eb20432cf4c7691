"""The trainer behind ``masksub train``: config, data, loop, checkpoints, run folder."""

from .config import Config, ConfigError, load_config
from .trainer import Trainer

__all__ = ["Config", "ConfigError", "Trainer", "load_config"]

"""Hyperparameters of the lifelong methods: moved to :mod:`superedit.editing.hparams` (re-exported here)."""

from ..editing.hparams import FACTOR_KINDS, AlphaEditHParams, D4SHParams, HParamsError

__all__ = ["FACTOR_KINDS", "AlphaEditHParams", "D4SHParams", "HParamsError"]

"""The training machinery recipes drive: config, data order, the trainer, logs, checkpoints, run folders."""

from dadpo.training.config import LoopConfig, run_differences
from dadpo.training.data import global_batch_rows, process_rows, split_eval
from dadpo.training.trainer import Step, Trainer, per_item_means

__all__ = ["LoopConfig", "Trainer", "Step", "split_eval", "global_batch_rows", "process_rows", "per_item_means",
           "run_differences"]

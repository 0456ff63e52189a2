"""Training: the loop alone (:class:`Trainer`), its config, and the run folder it writes.

* :mod:`.config`: :class:`TrainingConfig`, the optimizers and schedules it names;
* :mod:`.trainer`: :class:`Trainer`, epochs of steps that the model defines, interrupts and resume;
* :mod:`.run_folder`: config.json, metrics, checkpoint.pt, TensorBoard; :func:`load_model`;
* :mod:`.distributed`: rank and world size from torch.distributed, shards of each global batch,
  all-reduces, and the process group torchrun's environment describes.
"""

from .config import LR_SCHEDULES, OPTIMIZERS, StagedDecay, TrainingConfig
from .run_folder import CHECKPOINT_FILE, CONFIG_FILE, METRICS_CSV, METRICS_JSON, WEIGHTS_FILE, RunFolder, load_model, save_weights
from .trainer import FUSED_ADAM, HISTORY_COLUMNS, Trainer, TrainingError

__all__ = [
    "TrainingConfig", "StagedDecay", "TrainingError", "Trainer", "RunFolder", "load_model", "save_weights", "LR_SCHEDULES", "OPTIMIZERS",
    "FUSED_ADAM", "HISTORY_COLUMNS", "CHECKPOINT_FILE", "WEIGHTS_FILE", "CONFIG_FILE", "METRICS_CSV", "METRICS_JSON",
]

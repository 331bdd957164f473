"""What a run writes and reads besides the model file: the metrics log and rank 0's progress line, checkpoints, and
the atomic-rename helper that keeps every file whole (model files: ``asyncsgd.model.files``)."""
from asyncsgd.io.atomic import atomic_path
from asyncsgd.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from asyncsgd.io.metrics import Reporter, write_json_atomic
from asyncsgd.io.progress_line import ProgressLine

__all__ = ["atomic_path", "Checkpoint", "load_checkpoint", "save_checkpoint", "Reporter", "write_json_atomic",
           "ProgressLine"]

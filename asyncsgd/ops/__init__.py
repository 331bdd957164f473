"""Operations around training: the metrics log and progress line, checkpoints, and model files."""
from .atomic import atomic_path
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .metrics import Reporter, write_json_atomic
from .modelio import load_model, read_model, save_model, save_network
from .progress import ProgressLine

__all__ = ["atomic_path", "Checkpoint", "load_checkpoint", "save_checkpoint", "Reporter", "write_json_atomic",
           "load_model", "read_model", "save_model", "save_network", "ProgressLine"]

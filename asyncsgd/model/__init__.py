"""The network on one flat parameter vector: layers, builders, and the numpy primitives (GPU ones in asyncsgd.gpu)."""
from .builders import MODEL_NAMES, build_model, default_ops
from .layers import Conv2D, Dense, Dropout, Flatten, Layer, MaxPool2D, ReLU
from .network import Network
from .ops import NumpyOps

__all__ = ["MODEL_NAMES", "build_model", "default_ops", "Network", "NumpyOps",
           "Layer", "Conv2D", "MaxPool2D", "ReLU", "Flatten", "Dense", "Dropout"]

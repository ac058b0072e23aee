"""Training: one loop (``train``) for fine-tuning pruned models and for training the demo model.

``recipe`` (hyper-parameters; timm's AdamW factory and cosine schedule), ``data`` (digits, image
folders), ``distributed`` (torchrun), ``evaluate`` (top-1 / top-5), ``state`` (the run on disk and
``--resume``), ``loop`` (the loop), ``demo_model`` (the tiny digits Swin and its shipped checkpoint).
"""

from .data import Data, digits_datasets, image_folder_datasets, load_data
from ..io.demo_model import DEMO_ASSET, build_swin, load_demo_model, small_swin, small_swin_config
from .distributed import Dist
from .evaluate import evaluate, flush_denormals
from .loop import train
from .recipe import DEMO_RECIPE, DIGITS_RECIPE, PAPER_RECIPE, Recipe, make_optimizer, make_scheduler
from .state import MODEL_FILE, STATE_FILE, TrainState, load_train_state, save_train_state

__all__ = [
    "Data", "digits_datasets", "image_folder_datasets", "load_data",
    "DEMO_ASSET", "build_swin", "load_demo_model", "small_swin", "small_swin_config",
    "Dist", "evaluate", "flush_denormals", "train",
    "DEMO_RECIPE", "DIGITS_RECIPE", "PAPER_RECIPE", "Recipe", "make_optimizer", "make_scheduler",
    "MODEL_FILE", "STATE_FILE", "TrainState", "load_train_state", "save_train_state",
]

"""Training and evaluation of slimmable detectors."""
from .divergence import DivergenceMonitor
from .evaluation import check_widths_supported, inference_all_widths
from .report import format_width_table, save_width_report, width_rows
from .train_loop import SlimSimpleTrainer, all_reduce_gradients, slim_forward_backward
from .trainer import SlimTrainer, create_slim_ddp_model

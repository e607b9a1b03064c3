"""nano-megatron from Python: DeepSeek-V3 pre-training with the C library doing the work.

    from nanomegatron import Trainer, TrainConfig, ModelConfig, DataConfig
    config = TrainConfig(model=ModelConfig(hidden_size=256, num_layers=4), data=DataConfig(seq_len=256),
                         batch_size=16, lr=1e-3, warmup_steps=20, max_steps=200)
    trainer = Trainer(config)
    for step, metrics in trainer.train():
        print(step, metrics.loss)
    trainer.shutdown()

and the low-level layer (init_distributed, create_model, create_optimizer, forward_backward,
optimizer_step, DataLoader). See python/README.md.
"""
from ._lib import ConfigError, NMError, build_info, library_path
from .config import DataConfig, ModelConfig, StepMetrics, TrainConfig
from .distributed import DistContext, init_distributed, shutdown
from .model import (DataLoader, LossTerms, Model, Optimizer, TensorDict, create_dataloader, create_model,
                    create_optimizer, forward_backward, optimizer_step)
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = ["Trainer", "TrainConfig", "ModelConfig", "DataConfig", "StepMetrics", "init_distributed", "DistContext",
           "create_model", "create_optimizer", "forward_backward", "optimizer_step", "DataLoader",
           "create_dataloader", "shutdown", "Model",
           "Optimizer", "TensorDict", "LossTerms", "NMError", "ConfigError", "build_info", "library_path"]

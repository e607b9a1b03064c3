"""`pretrain`: the name the design's usage code imports (`from pretrain import Trainer, TrainConfig,
ModelConfig, DataConfig`). An alias of `nanomegatron`, not a copy: importing it puts the
nanomegatron module itself under this name, so `pretrain is nanomegatron` and every class,
function and exception is the same object."""
import sys

import nanomegatron

sys.modules[__name__] = nanomegatron

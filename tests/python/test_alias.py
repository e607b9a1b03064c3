"""`import pretrain`, the design's name for the package, is nanomegatron itself: the same module
object, so `from pretrain import Trainer, TrainConfig, ModelConfig, DataConfig` (the design's first
line) gives the very classes nanomegatron has."""
import nanomegatron


def test_pretrain_is_nanomegatron():
    import pretrain
    assert pretrain is nanomegatron
    from pretrain import DataConfig, ModelConfig, TrainConfig, Trainer
    assert (Trainer, TrainConfig, ModelConfig, DataConfig) == (nanomegatron.Trainer, nanomegatron.TrainConfig,
                                                               nanomegatron.ModelConfig, nanomegatron.DataConfig)
    assert pretrain.NMError is nanomegatron.NMError

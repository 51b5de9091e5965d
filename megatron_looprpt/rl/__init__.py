"""LoopRPT: reinforcement pre-training on the latent loop steps, with an EMA teacher."""

from megatron_looprpt.rl.ema import copy_params_, ema_update_
from megatron_looprpt.rl.looprpt_loss import (LoopRPTConfig, StudentOutputs, TeacherOutputs,
                                              looprpt_loss)

__all__ = ["LoopRPTConfig", "StudentOutputs", "TeacherOutputs", "looprpt_loss", "ema_update_",
           "copy_params_"]

"""The forward step for Bridge's `pretrain(config, forward_step)`: Bridge's own GPT step.

SpiralGPTModel takes GPTModel's forward arguments (input_ids, position_ids, attention_mask,
labels) and returns its per-token loss, so Bridge's `gpt_step.forward_step` (batch, loss mask,
NaN and spike checks, FLOP accounting) drives it unchanged. One thing is added: under pipeline
parallelism the core is replicated on every stage that runs loop iterations, and the replicas'
gradients must be summed over those stages after each step (spiral_megatron/parallel/pipeline.py), as
the project's job does in its `finalize_model_grads_func`. Bridge's `setup()` sets that hook to
Megatron's own after the model is built, so the step wraps it, once, before the schedule
reaches it at the end of the step.
"""

from functools import wraps

from megatron.bridge.training.gpt_step import forward_step as gpt_forward_step
from megatron.bridge.training.state import GlobalState
from megatron.core.utils import get_attr_wrapped_model, get_model_config

from spiral_megatron.parallel import pipeline


def forward_step(state: GlobalState, data_iterator, model, return_schedule_plan: bool = False):
    """Bridge's GPT forward step, with the core replicas' gradient sum added to the model
    config's `finalize_model_grads_func` where the core spans pipeline stages."""
    config = get_model_config(model)
    finalize = config.finalize_model_grads_func
    spiral = get_attr_wrapped_model(model, "core_replicas", return_model_obj=True)
    replicated = spiral.core_replicas is not None and spiral.core_replicas.replicated
    if replicated and finalize is not None and not getattr(finalize, "sums_core_replicas", False):
        config.finalize_model_grads_func = with_core_replicas(finalize)
    return gpt_forward_step(state, data_iterator, model, return_schedule_plan)


def with_core_replicas(finalize):
    """`finalize` (Megatron's finalize_model_grads as Bridge binds it), then the core replicas'
    gradients summed over pipeline stages."""

    @wraps(finalize)
    def finalize_model_grads(model, *args, **kwargs):
        result = finalize(model, *args, **kwargs)
        pipeline.allreduce_core_grads(model)
        return result

    finalize_model_grads.sums_core_replicas = True
    return finalize_model_grads

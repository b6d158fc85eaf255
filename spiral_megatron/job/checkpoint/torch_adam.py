"""Megatron's DistributedOptimizer over torch's Adam (no apex or Transformer Engine: CPUs, and
the pip install on GPUs): what loading its state needs beyond `optimizer.load_state_dict`."""

import torch


def distributed_optimizers(optimizer, any_backend: bool = False):
    """The DistributedOptimizers of `optimizer` that run torch's Adam (no apex/TE, e.g. CPU);
    all of them with `any_backend`."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE and not any_backend:
        return []
    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(opt, distrib_optimizer.DistributedOptimizer)]


def load_optimizer(optimizer, state) -> None:
    """`optimizer.load_state_dict(state)`, except for `fully_reshardable` state on torch's Adam
    (no apex/TE, e.g. CPU): there Megatron (0.16.1, 0.19.2) copies the loaded tensors into every
    tensor of each parameter's Adam state, torch's step count included, which the checkpoint
    keeps in the param groups instead: KeyError 'step'. The same public steps are taken with
    the step counts set aside while the parameter state loads (then `restore_adam_steps`)."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    torch_adam = distributed_optimizers(optimizer)
    states = [state] if len(chained) == 1 else (
        [v for _, v in sorted(state.items())] if isinstance(state, dict) else list(state))
    if (not torch_adam or len(torch_adam) != len(chained)
            or any(s.get("param_state_sharding_type") != "fully_reshardable" for s in states)):
        optimizer.load_state_dict(state)
        return
    for opt, opt_state in zip(chained, states):
        param_state = opt_state.pop("param_state")
        opt_state.pop("param_state_sharding_type")
        opt.load_state_dict(opt_state)  # param groups, torch's per-parameter step counts
        steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for param, step in steps.items():
            opt.optimizer.state[param]["step"] = step


def restore_adam_steps(optimizer) -> None:
    """After loading, torch's Adam keeps the step count it had before (0: build.create_adam_state)
    in its per-parameter state; the checkpoint's count is in the param groups (Megatron stores it
    there): copy it back, or the bias correction of the next step is wrong and the resume is not
    exact."""
    for opt in distributed_optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            if "step" in group:
                for param in group["params"]:
                    if param in opt.optimizer.state:
                        opt.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))

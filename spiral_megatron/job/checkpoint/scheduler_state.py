"""The LR schedule in a checkpoint: Megatron's OptimizerParamScheduler state plus WSD's two settings.

Megatron's `state_dict()` leaves out `wsd_decay_steps` and `lr_wsd_decay_style`, so its
`load_state_dict` neither compares nor restores them: a WSD run resumed with another annealing
would change its learning rate silently, and `use_checkpoint_opt_param_scheduler` would keep the
checkpoint's style WSD with this run's annealing (none: Megatron fails in its first step). The
job saves both beside Megatron's keys and treats them as the other schedule fields
(resume_check.SCHEDULE_FIELDS): compared on resume, restored with the checkpoint's schedule.
"""

WSD_FIELDS = ("wsd_decay_steps", "lr_wsd_decay_style")


def state_dict(scheduler) -> dict:
    """What a checkpoint holds of `scheduler`: Megatron's state and WSD's settings."""
    return {**scheduler.state_dict(), **{name: getattr(scheduler, name) for name in WSD_FIELDS}}


def load(scheduler, saved: dict) -> None:
    """WSD's settings, then Megatron's `load_state_dict`, each by Megatron's rule: the
    checkpoint's values unless override_opt_param_scheduler. WSD's come first: the load ends by
    setting the learning rate, which reads them. A checkpoint written before they were saved
    has none: this run's stay."""
    if not scheduler.override_opt_param_scheduler:
        for name in WSD_FIELDS:
            if name in saved:
                setattr(scheduler, name, saved[name])
    scheduler.load_state_dict(saved)

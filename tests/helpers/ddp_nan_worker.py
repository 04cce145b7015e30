"""`elastiformer train` with the distillation loss turned NaN on process 1 only, from its second step on (run under
`accelerate launch` by tests/training/test_distributed.py): both processes must stop with the one-line error, none
may hang."""

import os

import elastiformer.training.routers as trainer

_kl = trainer.kl_teacher_student
_calls = {"n": 0}


def kl_nan_on_rank_1(*args, **kwargs):
    out = _kl(*args, **kwargs)
    _calls["n"] += 1
    if int(os.environ.get("RANK", "0")) == 1 and _calls["n"] >= 2:
        return out * float("nan")
    return out


trainer.kl_teacher_student = kl_nan_on_rank_1

if __name__ == "__main__":
    from elastiformer.cli import main

    main()

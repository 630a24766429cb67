"""Name -> function registries, so YAML configs pick algorithms by name.

Each registry is a plain dict filled by a decorator at import time; users add their
own entries with the same decorator (`@POLICY_LOSSES.register("my_loss")`) without
forking. Unknown names raise a ValueError listing the valid names and the closest one.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable


class Registry(dict):
    """A dict of name -> callable with a registering decorator and a helpful lookup."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, *names: str) -> Callable[[Callable], Callable]:
        def decorator(fn: Callable) -> Callable:
            for name in names:
                if name in self and self[name] is not fn:
                    raise ValueError(f"{self.kind} '{name}' is already registered ({self[name]!r})")
                self[name] = fn
            return fn
        return decorator

    def lookup(self, name: str) -> Any:
        if name in self:
            return self[name]
        close = difflib.get_close_matches(str(name), list(self), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown {self.kind} '{name}'; valid names: {sorted(self)}{hint}")


ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")
KL_PENALTIES = Registry("kl penalty")
AGG_MODES = Registry("loss aggregation mode")
KL_CONTROLLERS = Registry("kl controller")

# The one call signature every registered advantage estimator accepts (keywords only).
# `dp_group`: the data-parallel process group (None: this batch is the whole batch), for the
# estimators whose statistics span the batch (whitening), so DP ranks whiten globally.
ESTIMATOR_ARGS = ("token_rewards", "response_mask", "group_index", "values",
                  "gamma", "lam", "norm_by_std", "eps", "dp_group")


def register_advantage_estimator(*names: str) -> Callable[[Callable], Callable]:
    """Register `fn` under `names` behind a uniform keyword adapter.

    The trainer calls every estimator the same way::

        est = get_advantage_estimator(cfg.adv_estimator)
        adv, ret = est(token_rewards=..., response_mask=..., group_index=..., values=...,
                       gamma=..., lam=..., norm_by_std=..., eps=...)

    The adapter forwards only the arguments `fn` declares; a `None` argument falls back
    to `fn`'s default, and a missing required one (e.g. `values` for GAE) raises a
    ValueError naming the estimator and the argument. `fn` itself is returned unchanged
    (and is reachable as `estimator.__wrapped__`).
    """

    def decorator(fn: Callable) -> Callable:
        params = inspect.signature(fn).parameters
        unknown = [p for p in params if p not in ESTIMATOR_ARGS]
        if unknown:
            raise TypeError(f"advantage estimator {fn.__name__} takes {unknown}, which are not in "
                            f"the uniform signature {ESTIMATOR_ARGS}")

        def estimator(*, token_rewards, response_mask, group_index=None, values=None,
                      gamma=None, lam=None, norm_by_std=None, eps=None, dp_group=None):
            given = dict(token_rewards=token_rewards, response_mask=response_mask,
                         group_index=group_index, values=values, gamma=gamma, lam=lam,
                         norm_by_std=norm_by_std, eps=eps, dp_group=dp_group)
            kwargs = {}
            for pname, p in params.items():
                if given[pname] is not None:
                    kwargs[pname] = given[pname]
                elif p.default is inspect.Parameter.empty:
                    raise ValueError(f"advantage estimator '{names[0]}' needs '{pname}', got None")
            return fn(**kwargs)

        estimator.__name__ = f"{fn.__name__}_uniform"
        estimator.__doc__ = fn.__doc__
        estimator.__wrapped__ = fn
        ADVANTAGE_ESTIMATORS.register(*names)(estimator)
        return fn

    return decorator


def get_advantage_estimator(name: str) -> Callable:
    return ADVANTAGE_ESTIMATORS.lookup(name)


def get_policy_loss(name: str) -> Callable:
    return POLICY_LOSSES.lookup(name)


def get_agg_mode(name: str) -> Callable:
    return AGG_MODES.lookup(name)


def get_kl_controller(name: str) -> Callable:
    return KL_CONTROLLERS.lookup(name)

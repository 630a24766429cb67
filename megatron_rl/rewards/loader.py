"""Load a user reward named in the config: `pkg.module:function` or `path/to/file.py:function`.

Loaded functions are cached by spec, so naming the same spec twice (or in a reward
worker process) gives the same object; a file is imported once under a private
module name that is also put in `sys.modules` (so its functions pickle by reference).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

_CACHE: dict[str, Callable] = {}


def load_function(spec: str) -> Callable:
    if spec in _CACHE:
        return _CACHE[spec]
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"reward function '{spec}': expected 'module:function' or 'path/to/file.py:function'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(Path(target), spec)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ImportError(f"reward function '{spec}': cannot import module '{target}' ({e})") from e
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise AttributeError(f"reward function '{spec}': '{target}' has no attribute '{name}'; "
                             f"its callables are {public}")
    if not callable(fn):
        raise TypeError(f"reward function '{spec}': '{name}' is a {type(fn).__name__}, not a function")
    _CACHE[spec] = fn
    return fn


def _import_file(path: Path, spec: str):
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"reward function '{spec}': file not found: {path}")
    mod_name = f"_megatron_rl_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        del sys.modules[mod_name]
        raise
    return module

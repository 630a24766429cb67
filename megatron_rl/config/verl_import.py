"""`megatron-rl import-config --from verl FILE.yaml [key=value ...] --out OUT.yaml`.

Reads a verl PPO/GRPO trainer config (verl's `ppo_trainer.yaml`, `ppo_megatron_trainer.yaml`
or a generated full dump, plus the Hydra-style dotted overrides of a launch command:
`key=value`, `+key=value`, `~key`), resolves `${a.b}` interpolations, and writes our YAML.
Every verl key that is set (not null / empty) and not translated is reported with the
reason; nothing set is dropped silently. The written file is loaded back through our
config loader, so an output that would not train is an error here.

Unit conversions (verl -> megatron-rl):
- `ppo_mini_batch_size` counts PROMPTS in verl (it is multiplied by `rollout.n`); ours
  counts samples: actor.mini_batch_size = ppo_mini_batch_size x n (critic likewise).
- verl steps its LR scheduler once per rollout step; ours once per optimizer step, so
  warm-up steps are multiplied by the optimizer steps per rollout
  (ppo_epochs x train_batch_size / ppo_mini_batch_size). `lr_warmup_steps_ratio` is of
  the total rollout steps, as in verl.
- `total_epochs` without `total_training_steps` needs the train files' row count (read
  from the parquet files when they exist here).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from megatron_rl.config.loader import ConfigError, load_yaml, set_dotted

AR = "actor_rollout_ref"
ESTIMATORS = {"gae", "grpo", "reinforce_plus_plus", "rloo"}
KL_TYPES = {"kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"}
ENGINES = {"vllm": "vllm", "hf": "native", "sglang": "vllm"}
SINKS = {"console": "console", "wandb": "wandb", "tensorboard": "tensorboard"}

# Prefixes of keys with no counterpart, and why (the first match wins; the default reason
# is NO_EQUIVALENT). Listed so the report says something useful.
REASONS = [
    (r".*log_prob_(micro_batch_size|max_token_len|use_dynamic_bsz)", "log-prob passes use actor.micro_batch_size "
     "(or actor.max_tokens_per_microbatch when packing)"),
    (r"(actor_rollout_ref\.(actor|ref)|critic(\.model)?)\.fsdp_config\.", "FSDP settings: megatron-rl shards with "
     "Megatron TP/PP/DP (model.tp, model.pp) and its distributed optimizer"),
    (r".*\.checkpoint\.", "checkpoint contents: megatron-rl always saves model, optimizer and trainer state"),
    (r"actor_rollout_ref\.rollout\.", "rollout engine option with no megatron-rl key; vLLM start-up options "
     "are rollout.vllm.* (megatron_rl/rollout/vllm_config.py)"),
    (r".*\.megatron\.", "Megatron option not mapped (model.* holds tp/pp/vpp/cp/ep/sequence_parallel)"),
    (r".*(use_torch_compile|use_remove_padding|use_fused_kernels|use_liger)", "kernel choice: megatron-rl picks "
     "its fused loss (actor.fused_loss) and packing (actor.max_tokens_per_microbatch)"),
    (r".*ulysses_sequence_parallel_size", "Ulysses sequence parallelism: use model.cp (docs/run_plan.md)"),
    (r"trainer\.(n_gpus_per_node|nnodes)", "the world size comes from the launcher (torchrun --nproc N); "
     "check the layout with `megatron-rl plan --config OUT --world-size N`"),
    (r"(ray_init|ray_kwargs|global_profiler)\.", "Ray / profiler set-up: megatron-rl runs SPMD under torchrun"),
]
NO_EQUIVALENT = "no megatron-rl equivalent"


@dataclass
class Translation:
    config: dict = field(default_factory=dict)                          # our nested YAML
    untranslated: list[tuple[str, Any, str]] = field(default_factory=list)  # (verl key, value, reason)
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"note: {n}" for n in self.notes]
        if self.untranslated:
            lines.append(f"{len(self.untranslated)} verl keys not translated:")
            lines += [f"  {k} = {v!r}: {why}" for k, v, why in self.untranslated]
        return "\n".join(lines)


# --- reading verl's config ------------------------------------------------------------
def load_verl(path, overrides: list[str] | None = None) -> dict:
    data = load_yaml(path)
    data.pop("_target_", None)
    for item in overrides or []:
        if item.startswith("~"):
            _delete(data, item[1:].split("=")[0])
            continue
        if "=" not in item:
            raise ConfigError(f"verl override {item!r} must look like key=value (or +key=value, ~key)")
        key, raw = item.lstrip("+").split("=", 1)
        set_dotted(data, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return _resolve(data, data)


def _delete(data: dict, dotted: str) -> None:
    *head, last = dotted.split(".")
    for k in head:
        data = data.get(k) or {}
    data.pop(last, None)


_REF = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def _lookup(root: dict, dotted: str):
    cur: Any = root
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            raise ConfigError(f"verl config: interpolation ${{{dotted}}} names a missing key")
        cur = cur[k]
    return cur


def _resolve(node, root, depth: int = 0):
    if depth > 20:
        raise ConfigError("verl config: interpolations nest too deeply (a cycle?)")
    if isinstance(node, dict):
        return {k: _resolve(v, root, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, depth) for v in node]
    if isinstance(node, str):
        whole = _REF.fullmatch(node)
        if whole:
            return _resolve(_lookup(root, whole.group(1)), root, depth + 1)
        if "${" in node:
            return _REF.sub(lambda m: str(_resolve(_lookup(root, m.group(1)), root, depth + 1)), node)
    return node


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def is_set(value) -> bool:
    return value is not None and value != {} and value != [] and value != ""


# --- translation ----------------------------------------------------------------------
class _Keys:
    """The flat verl keys; `get` marks a key as translated (consumed)."""

    def __init__(self, flat: dict[str, Any]):
        self.flat, self.used = flat, set()

    def get(self, key: str, default=None):
        self.used.add(key)
        v = self.flat.get(key)
        return v if is_set(v) else default

    def has(self, key: str) -> bool:
        return is_set(self.flat.get(key))

    def under(self, prefix: str) -> dict[str, Any]:
        return {k: v for k, v in self.flat.items() if k.startswith(prefix)}


def translate(verl: dict) -> Translation:
    k = _Keys(flatten(verl))
    t = Translation()
    cfg = t.config

    def put(ours: str, value) -> None:
        if value is not None:
            set_dotted(cfg, ours, value)

    def refuse(key: str, why: str) -> None:
        k.used.add(key)
        t.untranslated.append((key, k.flat.get(key), why))

    # data
    for ours, theirs in (("data.train_files", "data.train_files"), ("data.val_files", "data.val_files"),
                         ("data.prompt_key", "data.prompt_key"), ("data.max_prompt_length", "data.max_prompt_length"),
                         ("data.train_batch_size", "data.train_batch_size"), ("data.val_batch_size", "data.val_batch_size"),
                         ("data.shuffle", "data.shuffle"), ("data.filter_overlong_prompts", "data.filter_overlong_prompts"),
                         ("data.seed", "data.seed")):
        v = k.get(theirs)
        if ours.endswith("files") and v is not None:
            v = [os.path.expanduser(f) for f in ([v] if isinstance(v, str) else v)]
        put(ours, v)
    if k.has("data.truncation"):
        trunc = k.get("data.truncation")
        if trunc in ("error", "left", "right"):
            put("data.truncation", trunc)
        else:
            refuse("data.truncation", f"{trunc!r}: megatron-rl truncates error|left|right")
    if k.get("data.reward_fn_key", "data_source") != "data_source":
        refuse("data.reward_fn_key", "rewards are selected by the `data_source` field (reward.data_source_map)")
    put("rollout.max_new_tokens", k.get("data.max_response_length"))

    # model
    path = k.get(f"{AR}.model.path")
    put("model.path", None if path is None else os.path.expanduser(path))
    if k.get(f"{AR}.hybrid_engine") is True:
        pass                                # colocated engine: our default (rollout.colocate)
    if k.get(f"{AR}.model.enable_gradient_checkpointing"):
        put("model.recompute", "full")

    # rollout
    r = f"{AR}.rollout"
    n = int(k.get(f"{r}.n", 1))
    put("rollout.n", n if k.has(f"{r}.n") else None)
    put("rollout.temperature", _float(k.get(f"{r}.temperature")))
    put("rollout.top_p", _float(k.get(f"{r}.top_p")))
    put("rollout.top_k", k.get(f"{r}.top_k"))
    put("rollout.ignore_eos", k.get(f"{r}.ignore_eos"))
    put("rollout.gpu_memory_utilization", _float(k.get(f"{r}.gpu_memory_utilization")))
    if k.has(f"{r}.name"):
        name = k.get(f"{r}.name")
        if name in ENGINES:
            put("rollout.engine", ENGINES[name])
            if name == "sglang":
                t.notes.append("rollout.name=sglang: megatron-rl has no SGLang engine; rollout.engine=vllm instead")
        else:
            refuse(f"{r}.name", f"engine {name!r}: megatron-rl has native (verl's hf) and vllm")
    if k.has(f"{r}.tensor_model_parallel_size"):
        put("rollout.vllm.tensor_parallel_size", int(k.get(f"{r}.tensor_model_parallel_size")))
    resp = k.get("data.max_response_length")
    for key, ref in ((f"{r}.response_length", resp), (f"{r}.prompt_length", k.get("data.max_prompt_length"))):
        if k.has(key) and k.get(key) != ref:
            refuse(key, f"differs from the data length ({ref}); megatron-rl uses data.max_prompt_length and "
                        "rollout.max_new_tokens")
    if k.has(f"{r}.val_kwargs.do_sample") or k.has(f"{r}.val_kwargs.temperature"):
        val_t = _float(k.get(f"{r}.val_kwargs.temperature", 0.0))
        sample = bool(k.get(f"{r}.val_kwargs.do_sample", False)) and val_t > 0
        put("rollout.val_greedy", not sample)
        put("rollout.val_temperature", val_t if sample else 0.0)
    if int(k.get(f"{r}.val_kwargs.n", 1)) != 1:
        refuse(f"{r}.val_kwargs.n", "validation scores one greedy/sampled response per prompt")
    for key in (f"{r}.val_kwargs.top_p", f"{r}.val_kwargs.top_k"):
        if k.has(key) and k.get(key) not in (1, 1.0, -1):
            refuse(key, "validation sampling has only a temperature here")

    # actor
    a = f"{AR}.actor"
    optim = f"{a}.optim"
    put("actor.optim.lr", _float(k.get(f"{optim}.lr")))
    put("actor.optim.weight_decay", _float(k.get(f"{optim}.weight_decay")))
    put("actor.optim.betas", k.get(f"{optim}.betas"))
    clip_grad = k.get(f"{optim}.clip_grad", k.get(f"{a}.grad_clip"))
    k.get(f"{a}.grad_clip")
    put("actor.optim.clip_grad", _float(clip_grad))
    if k.has(f"{optim}.min_lr_ratio") and k.has(f"{optim}.lr"):
        put("actor.optim.min_lr", _float(k.get(f"{optim}.min_lr_ratio")) * _float(k.get(f"{optim}.lr")))
    for style_key in (f"{optim}.lr_scheduler_type", f"{optim}.warmup_style"):   # new name, old name
        if k.has(style_key):
            style = k.get(style_key)
            if style in ("constant", "cosine", "linear"):
                put("actor.optim.lr_schedule", style)
            else:
                refuse(style_key, f"LR schedule {style!r}: constant|cosine|linear")
            break
    put("actor.ppo_epochs", k.get(f"{a}.ppo_epochs"))
    ppo_mini = k.get(f"{a}.ppo_mini_batch_size")
    if ppo_mini is not None:
        put("actor.mini_batch_size", int(ppo_mini) * n)
    put("actor.micro_batch_size", k.get(f"{a}.ppo_micro_batch_size_per_gpu"))
    if k.has(f"{a}.ppo_micro_batch_size"):
        refuse(f"{a}.ppo_micro_batch_size", "the deprecated global micro-batch size; set "
                                            "ppo_micro_batch_size_per_gpu (actor.micro_batch_size)")
    if k.get(f"{a}.use_dynamic_bsz"):
        put("actor.max_tokens_per_microbatch", k.get(f"{a}.ppo_max_token_len_per_gpu"))
    else:
        k.used.add(f"{a}.ppo_max_token_len_per_gpu")
    low = k.get(f"{a}.clip_ratio_low", k.get(f"{a}.clip_ratio"))
    high = k.get(f"{a}.clip_ratio_high", k.get(f"{a}.clip_ratio"))
    put("algos.clip_low", _float(low))
    put("algos.clip_high", _float(high))
    put("algos.clip_c", _float(k.get(f"{a}.clip_ratio_c")))
    put("algos.loss_agg_mode", k.get(f"{a}.loss_agg_mode"))
    put("algos.entropy_coef", _float(k.get(f"{a}.entropy_coeff")))
    put("algos.use_kl_loss", k.get(f"{a}.use_kl_loss"))
    put("algos.kl_loss_coef", _float(k.get(f"{a}.kl_loss_coef")))
    if k.has(f"{a}.kl_loss_type"):
        kind = k.get(f"{a}.kl_loss_type")
        if kind.rstrip("+") in KL_TYPES:
            put("algos.kl_loss_kind", kind)
        else:
            refuse(f"{a}.kl_loss_type", f"KL estimator {kind!r}: one of {sorted(KL_TYPES)}")
    if k.has(f"{a}.policy_loss.loss_mode") and k.get(f"{a}.policy_loss.loss_mode") not in ("vanilla", "gspo"):
        refuse(f"{a}.policy_loss.loss_mode", "policy losses here: vanilla (ppo), gspo")
    elif k.get(f"{a}.policy_loss.loss_mode") == "gspo":
        put("algos.policy_loss", "gspo")
    if k.has(f"{a}.strategy") and k.get(f"{a}.strategy") != "megatron":
        t.notes.append(f"actor.strategy={k.flat[f'{a}.strategy']}: megatron-rl trains with Megatron-Core; "
                       "set model.tp / model.pp for the layout")

    # Megatron layout (actor; the reference shares it)
    meg = f"{a}.megatron"
    for ours, theirs in (("model.tp", "tensor_model_parallel_size"), ("model.pp", "pipeline_model_parallel_size"),
                         ("model.vpp", "virtual_pipeline_model_parallel_size"), ("model.cp", "context_parallel_size"),
                         ("model.ep", "expert_model_parallel_size"), ("model.sequence_parallel", "sequence_parallel")):
        put(ours, k.get(f"{meg}.{theirs}"))
    put("actor.optim.distributed_optimizer", k.get(f"{meg}.use_distributed_optimizer"))
    for key, v in k.under(f"{AR}.ref.megatron.").items():
        theirs = key.rsplit(".", 1)[1]
        if theirs == "param_offload":
            continue
        if k.flat.get(f"{meg}.{theirs}") == v:
            k.used.add(key)                 # the reference inherits the actor's layout
    offload = k.get(f"{AR}.ref.megatron.param_offload") or k.get(f"{AR}.ref.fsdp_config.param_offload")
    if offload:
        put("ref.offload", True)

    # algorithm
    if k.has("algorithm.adv_estimator"):
        est = k.get("algorithm.adv_estimator")
        if est in ESTIMATORS:
            put("algos.adv_estimator", est)
            if est == "gae":
                put("critic.enable", True)
        else:
            refuse("algorithm.adv_estimator", f"estimator {est!r}: megatron-rl has {sorted(ESTIMATORS)}")
    put("algos.gamma", _float(k.get("algorithm.gamma")))
    put("algos.lam", _float(k.get("algorithm.lam")))
    put("algos.norm_by_std", k.get("algorithm.norm_adv_by_std_in_grpo"))
    put("algos.use_kl_in_reward", k.get("algorithm.use_kl_in_reward"))
    put("algos.kl_in_reward_kind", k.get("algorithm.kl_penalty"))
    put("algos.kl_ctrl", k.get("algorithm.kl_ctrl.type"))
    put("algos.kl_coef", _float(k.get("algorithm.kl_ctrl.kl_coef")))
    if k.get("algorithm.kl_ctrl.type") == "adaptive":
        put("algos.target_kl", _float(k.get("algorithm.kl_ctrl.target_kl")))
        put("algos.kl_horizon", _float(k.get("algorithm.kl_ctrl.horizon")))
    else:
        k.used.update({"algorithm.kl_ctrl.target_kl", "algorithm.kl_ctrl.horizon"})   # unused by a fixed controller
    if k.get("algorithm.filter_groups.enable"):                       # DAPO recipe
        put("algos.dynamic_sampling.enable", True)
        metric = k.get("algorithm.filter_groups.metric", "acc")
        put("algos.dynamic_sampling.metric", metric)
        put("algos.dynamic_sampling.max_num_gen_batches", k.get("algorithm.filter_groups.max_num_gen_batches"))
    else:
        k.used.update({"algorithm.filter_groups.metric", "algorithm.filter_groups.max_num_gen_batches"})
    if k.get("reward_model.overlong_buffer.enable"):                  # DAPO recipe
        put("reward.overlong.buffer_len", k.get("reward_model.overlong_buffer.len"))
        put("reward.overlong.penalty_factor", _float(k.get("reward_model.overlong_buffer.penalty_factor")))
    else:
        k.used.update({"reward_model.overlong_buffer.len", "reward_model.overlong_buffer.penalty_factor"})
    if k.get("reward_model.enable"):
        refuse("reward_model.enable", "a verl reward-model worker: configure reward.model.path instead")
    k.get("reward_model.reward_manager")      # naive / dapo / prime: one reward manager here
    fn_path = k.get("custom_reward_function.path")
    fn_name = k.get("custom_reward_function.name", "compute_score")
    if fn_path:
        put("reward.custom_functions", {fn_name: f"{fn_path}:{fn_name}"})
        put("reward.name", fn_name)
    else:
        put("reward.name", "verl_default")
        t.notes.append("no custom_reward_function: reward.name=verl_default (verl's scorer by data_source)")

    _critic(k, t, put, n)
    _trainer(k, t, put)
    _steps(k, t, put, n)
    for key, value in k.flat.items():
        if key not in k.used and is_set(value):
            t.untranslated.append((key, value, _reason(key)))
    return t


def _critic(k: _Keys, t: Translation, put: Callable, n: int) -> None:
    """verl's critic section only matters under GAE; otherwise its set keys are reported."""
    k.get("critic.strategy")
    if k.flat.get("algorithm.adv_estimator") != "gae":
        for key, v in k.under("critic.").items():
            if key not in k.used and is_set(v):
                k.used.add(key)
                t.untranslated.append((key, v, "the critic is unused: algorithm.adv_estimator is not gae"))
        return
    put("critic.optim.lr", _float(k.get("critic.optim.lr")))
    put("critic.cliprange_value", _float(k.get("critic.cliprange_value")))
    put("critic.ppo_epochs", k.get("critic.ppo_epochs"))
    put("critic.micro_batch_size", k.get("critic.ppo_micro_batch_size_per_gpu"))
    if k.has("critic.ppo_mini_batch_size"):
        put("critic.mini_batch_size", int(k.get("critic.ppo_mini_batch_size")) * n)
    path = k.get("critic.model.path")
    if path and path != k.flat.get(f"{AR}.model.path"):
        put("critic.path", path)


def _trainer(k: _Keys, t: Translation, put: Callable) -> None:
    save, test = k.get("trainer.save_freq"), k.get("trainer.test_freq")
    put("trainer.save_every", None if save is None else max(int(save), 0))
    put("trainer.val_every", None if test is None else max(int(test), 0))
    put("trainer.val_before_train", k.get("trainer.val_before_train"))
    put("trainer.critic_warmup", k.get("trainer.critic_warmup"))
    mode = k.get("trainer.resume_mode")
    if mode is not None:
        put("trainer.resume", {"auto": "auto", "disable": "none"}.get(mode, k.get("trainer.resume_from_path")))
    put("logging.run_dir", k.get("trainer.default_local_dir"))
    put("logging.project", k.get("trainer.project_name"))
    put("logging.experiment_name", k.get("trainer.experiment_name"))
    sinks = k.get("trainer.logger")
    if sinks is not None:
        sinks = [sinks] if isinstance(sinks, str) else list(sinks)
        unknown = [s for s in sinks if s not in SINKS]
        put("logging.sinks", [SINKS[s] for s in sinks if s in SINKS])
        if unknown:
            t.untranslated.append(("trainer.logger", unknown, f"sinks here: {sorted(SINKS)} (+ jsonl)"))


def _steps(k: _Keys, t: Translation, put: Callable, n: int) -> None:
    """trainer.total_steps from total_training_steps or total_epochs, and the warm-up in
    optimizer steps (module docstring)."""
    steps = k.get("trainer.total_training_steps")
    epochs = k.get("trainer.total_epochs")
    batch = k.get("data.train_batch_size")
    if steps is None and epochs is not None:
        rows = _row_count(k.flat.get("data.train_files"))
        if rows is None or not batch:
            t.untranslated.append(("trainer.total_epochs", epochs, "needs the train files' row count (not readable "
                                   "here) and data.train_batch_size; pass trainer.total_training_steps=N"))
        else:
            steps = int(epochs) * (rows // int(batch))
            t.notes.append(f"trainer.total_epochs={epochs} x {rows // int(batch)} batches of {batch} prompts "
                           f"({rows} rows) = {steps} steps")
    put("trainer.total_steps", None if steps is None else int(steps))
    optim = f"{AR}.actor.optim"
    warm = k.get(f"{optim}.lr_warmup_steps")
    ratio = _float(k.get(f"{optim}.lr_warmup_steps_ratio"))
    k.get(f"{optim}.total_training_steps")
    if warm is None or int(warm) < 0:
        warm = math.floor(ratio * steps) if (ratio and steps) else 0
    if warm:
        mini = k.flat.get(f"{AR}.actor.ppo_mini_batch_size") or batch
        per_rollout = int(k.flat.get(f"{AR}.actor.ppo_epochs") or 1) * (int(batch) // int(mini)) if batch else 1
        put("actor.optim.lr_warmup_steps", int(warm) * max(per_rollout, 1))
        if per_rollout > 1:
            t.notes.append(f"LR warm-up: verl's {warm} rollout steps = {int(warm) * per_rollout} optimizer steps "
                           f"({per_rollout} per rollout)")


def _row_count(files) -> int | None:
    files = [files] if isinstance(files, str) else list(files or [])
    total = 0
    for f in files:
        p = Path(f).expanduser()
        if not p.is_file() or p.suffix != ".parquet":
            return None
        import pyarrow.parquet as pq
        total += pq.ParquetFile(p).metadata.num_rows
    return total or None


def _float(v):
    return None if v is None else float(v)


def _reason(key: str) -> str:
    for pattern, why in REASONS:
        if re.match(pattern, key):
            return why
    return NO_EQUIVALENT


def import_config(path, overrides: list[str] | None, out) -> Translation:
    """Translate `path` (+ overrides), write `out`, and check it loads as our config."""
    from megatron_rl.config import load_experiment_config

    t = translate(load_verl(path, overrides))
    header = (f"# Imported from verl config {path}" + (f" with overrides {' '.join(overrides)}" if overrides else "")
              + "\n# by `megatron-rl import-config`; see docs/verl_migration.md\n")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(header + yaml.safe_dump(t.config, sort_keys=False))
    load_experiment_config(out)
    return t

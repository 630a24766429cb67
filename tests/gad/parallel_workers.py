"""Worker functions of the multi-process GAD tests, in a module of their own so spawned
processes can import them by name (`tests.gad.parallel_workers`)."""
import torch


def pairs_batches(seed=0, b=4, p=5, r=6, vocab=96):
    """(students [b], teachers [b // 2], pair): two students per prompt, ragged masks."""
    from megatron_rl.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(0, vocab, (b // 2, p), generator=g)
    prompt_mask = torch.ones(b // 2, p, dtype=torch.long)
    prompt_mask[1, :2] = 0                                            # left padding
    teacher_mask = torch.ones(b // 2, r)
    teacher_mask[0, 3:] = 0                                           # right padding
    student_mask = torch.ones(b, r)
    student_mask[2, 4:] = 0
    student_mask[3, 1:] = 0
    teachers = Batch({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                      "response_ids": torch.randint(0, vocab, (b // 2, r), generator=g),
                      "response_mask": teacher_mask}, [{} for _ in range(b // 2)])
    students = Batch({"prompt_ids": prompt_ids.repeat_interleave(2, 0),
                      "prompt_mask": prompt_mask.repeat_interleave(2, 0),
                      "response_ids": torch.randint(0, vocab, (b, r), generator=g),
                      "response_mask": student_mask}, [{} for _ in range(b)])
    return students, teachers, torch.arange(b) // 2


def _discriminator_step(rank, world, hf, tp, pp, out):
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.value_head import attach_value_head
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.trainer.build import build_optimizer, wrap_ddp
    from megatron_rl.trainer.discriminator import Discriminator

    init_distributed(tp=tp, pp=pp)
    model = load_checkpoint(hf, layer_spec="local")
    attach_value_head(model, seed=0)
    ddp = wrap_ddp(model, False)
    opt, sched = build_optimizer(ddp, OptimConfig(lr=1e-3, clip_grad=1.0), "float32", 10)
    disc = Discriminator(ddp, opt, sched, micro_batch_size=2)   # 3 micro-batches of teacher ++ student rows
    students, teachers, pair = pairs_batches()
    s, t = disc.scores(students), disc.scores(teachers)
    metrics = disc.update(students, teachers, pair, s, t)
    after = disc.scores(students)
    if torch.distributed.get_rank() == 0:
        torch.save({"student": s, "teacher": t, "metrics": metrics, "after": after}, out)
    destroy_distributed()

"""torch.distributed / Megatron parallel_state start-up and the CPU shims."""
from megatron_rl.parallel.state import (destroy_distributed, init_distributed, is_pp_first,
                                        is_pp_last, pp_rank, pp_size, tp_rank, tp_size)
from megatron_rl.parallel.cpu_compat import install_cpu_shims

__all__ = ["init_distributed", "destroy_distributed", "install_cpu_shims", "tp_rank", "tp_size",
           "pp_rank", "pp_size", "is_pp_first", "is_pp_last"]

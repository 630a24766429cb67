"""Weight sync from the Megatron actor to a rollout engine: bucketing (tensors larger
than a bucket are split), one interface, and a transport per path (colocated
in-process / CUDA IPC, broadcast over NCCL for separate GPUs, native engine)."""
from megatron_rl.rollout.weight_sync.base import TRANSPORTS, WeightTransport, build_transport, register_transport, sync_weights
from megatron_rl.rollout.weight_sync.bucketing import ALIGN, Bucket, BucketReceiver, Piece, iter_buckets
from megatron_rl.rollout.weight_sync.broadcast import BroadcastTransport, PyNcclComm, TorchDistComm, receive_broadcast
from megatron_rl.rollout.weight_sync.colocated import ColocatedTransport, receive_bucket
from megatron_rl.rollout.weight_sync.native import NativeTransport

__all__ = ["TRANSPORTS", "WeightTransport", "build_transport", "register_transport", "sync_weights", "ALIGN",
           "Bucket", "BucketReceiver", "Piece", "iter_buckets", "BroadcastTransport", "PyNcclComm",
           "TorchDistComm", "receive_broadcast", "ColocatedTransport", "receive_bucket", "NativeTransport"]

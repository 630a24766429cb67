"""Place shared services (the search agent's retriever) on a Ray cluster, optionally.

Training itself never needs Ray: torchrun/SLURM start the SPMD ranks. A retriever
that many nodes query is a separate long-lived process; on a Ray cluster this script
starts it as a detached named actor on a node with free CPUs and prints the URL for
`agent.retriever_url`.

    ray start --head                                   # or an existing cluster
    python launch/ray_services.py retriever --corpus data/search_qa/corpus.jsonl --port 8000
    python launch/ray_services.py stop retriever

Without Ray, run `megatron-rl serve-retriever --corpus ... --host 0.0.0.0` on any node.
"""
from __future__ import annotations

import argparse
import sys

SERVICES: dict[str, tuple] = {}          # name -> (add_arguments, start)
ACTOR_PREFIX = "megatron-rl-"


def service(name: str, add_arguments):
    def deco(start):
        SERVICES[name] = (add_arguments, start)
        return start
    return deco


def import_ray():
    try:
        import ray
    except ImportError:
        raise SystemExit("launch/ray_services.py: Ray is not installed. It is optional: `pip install 'ray[default]'` "
                         "to place services on a Ray cluster, or start the retriever directly with "
                         "`megatron-rl serve-retriever --corpus FILE --host 0.0.0.0`.") from None
    return ray


def _retriever_args(p: argparse.ArgumentParser) -> None:
    from megatron_rl.agent.retriever_server import add_arguments
    add_arguments(p)
    p.set_defaults(host="0.0.0.0")      # reachable from the training nodes (no auth: keep it on a private network)
    p.add_argument("--num-cpus", type=float, default=4, help="CPUs reserved for the actor")


@service("retriever", _retriever_args)
def start_retriever(ray, args) -> str:
    @ray.remote
    class Retriever:
        def __init__(self, corpus: str, host: str, port: int, topk: int, backend: str):
            from megatron_rl.agent.retriever_server import BM25Index, load_corpus, make_server, serve_in_thread
            self.index = BM25Index(load_corpus(corpus), backend)
            self.server = make_server(self.index, host, port, topk)
            serve_in_thread(self.server)

        def url(self) -> str:
            port = self.server.server_address[1]
            return f"http://{ray.util.get_node_ip_address()}:{port}/retrieve"

    actor = Retriever.options(name=ACTOR_PREFIX + "retriever", lifetime="detached", num_cpus=args.num_cpus,
                              get_if_exists=True).remote(args.corpus, args.host, args.port, args.topk, args.backend)
    return ray.get(actor.url.remote())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--address", default="auto", help="Ray cluster address (ray.init)")
    subs = ap.add_subparsers(dest="service", required=True)
    for name, (add_arguments, _) in SERVICES.items():
        add_arguments(subs.add_parser(name, help=f"start the {name} as a detached Ray actor"))
    stop = subs.add_parser("stop", help="kill a service's actor")
    stop.add_argument("name", choices=sorted(SERVICES))
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ray = import_ray()
    ray.init(address=args.address, namespace="megatron-rl")
    if args.service == "stop":
        ray.kill(ray.get_actor(ACTOR_PREFIX + args.name))
        print(f"stopped {args.name}")
        return 0
    url = SERVICES[args.service][1](ray, args)
    print(f"{args.service}: {url}\nset agent.retriever_url={url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

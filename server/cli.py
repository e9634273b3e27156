"""The `fedrec` command: the server side's tools that are not a Flower run (the federated
job is `flwr run .`): serve the global model and query it, audit runs' privacy ledgers,
compute privacy parameters, make deployment certificates. A device's own command is
`fedrec-device` (client/cli.py): server and client never import each other."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared_model.cli_options import add_data_options, positive_float, positive_int, run_command


def item_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected item ids separated by commas, not {text!r}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from server.serving.service import run_server
    from shared_model.datasets import load_catalog

    catalog = load_catalog(args.dataset, args.data_dir, seed=args.seed, synthetic_users=args.synthetic_users)
    run_server(Path(args.checkpoint), catalog, args.host, args.port)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    import grpc

    from server.serving.client import RecommenderClient

    with RecommenderClient(args.address) as client:
        try:
            items = client.recommend(history=args.history, profile=args.profile, k=args.k, exclude=args.exclude)
        except grpc.RpcError as error:
            print(f"fedrec recommend: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps([vars(i) for i in items], indent=2))
    else:
        for rank, item in enumerate(items, start=1):
            because = f"  (because of {', '.join(map(str, item.because))})" if item.because else ""
            print(f"{rank:3}. [{item.item_id}] {item.text}  score {item.score:.3f}{because}")
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
    from shared_model import privacy
    from shared_model.privacy import RELATION

    if args.privacy_command in ("epsilon", "noise"):
        what = f"sample rate {args.sample_rate}, {args.steps} steps"
        if args.tree_rounds:  # DP-FTRL: no sampling, its trees' (or the factorization's) Gaussian steps
            if args.sample_rate != 1.0:
                print("fedrec privacy: --tree-rounds (DP-FTRL) assumes no sampling: --sample-rate must be 1",
                      file=sys.stderr)
                return 2
            what = (f"DP-FTRL with {args.ftrl_noise} noise, {args.steps} rounds in trees of {args.tree_rounds}, "
                    "each user once a tree")
    if args.privacy_command == "epsilon":
        events = (privacy.ftrl_events(args.noise_multiplier, args.steps, args.tree_rounds, args.ftrl_noise)
                  if args.tree_rounds else [(args.noise_multiplier, args.sample_rate, args.steps)])
        eps = privacy.epsilon(events, args.delta, args.accountant)
        print(f"epsilon {eps:.4f} (delta {args.delta:g}, accountant {args.accountant}, {RELATION}, noise "
              f"{args.noise_multiplier}, {what})")
    elif args.privacy_command == "noise":
        z = (privacy.ftrl_noise_multiplier(args.epsilon, args.steps, args.tree_rounds, args.delta, args.accountant,
                                           args.ftrl_noise) if args.tree_rounds else
             privacy.noise_multiplier(args.epsilon, args.sample_rate, args.steps, args.delta, args.accountant))
        print(f"noise multiplier {z:.4f} (epsilon {args.epsilon} at delta {args.delta:g}, accountant "
              f"{args.accountant}, {RELATION}, {what})")
    else:
        bound = privacy.audit_lower_bound(args.canaries, args.guesses, args.correct, args.delta, args.confidence)
        print(f"epsilon lower bound {bound:.4f} ({args.correct} of {args.guesses} guesses right, {args.canaries} "
              f"canaries, delta {args.delta:g}, {args.confidence:.0%} confidence)")
    return 0


def default_parameters() -> int:
    """P of the model DP-FedAvg trains by default: the light head (lora-layers 0) without an
    id table (server-dp with dp = "none" refuses one), counted on the model itself."""
    import torch

    from shared_model.encoder import CatalogCache
    from shared_model.recommender import Recommender, RecommenderConfig

    config = RecommenderConfig(lora_layers=0, id_embeddings=False)
    model = Recommender(CatalogCache(0, pooled=torch.zeros(0, 0)), 0, config)  # no catalog: nothing to encode
    return sum(p.numel() for p in model.trainable_parameters().values())


def cmd_plan(args: argparse.Namespace) -> int:
    from server.privacy_plan import format_plan, make_plan

    if args.delta >= 1 / args.users:
        print(f"fedrec privacy plan: warning: --delta {args.delta:g} is not below 1 / --users ({1 / args.users:g}): "
              "publishing each user's data whole with probability delta meets it, exposing delta x N >= 1 users "
              "on average",
              file=sys.stderr)
    parameters = args.parameters or default_parameters()
    plan = make_plan(args.users, args.cohort, args.rounds, args.epsilon, args.delta, args.accountant, parameters,
                     args.count_noise, args.signal)
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from server.privacy_audit import audit_run, write_report

    audits = [audit_run(Path(folder), args.tolerance) for folder in args.runs]
    out = Path(args.out) if args.out else Path(args.runs[0]) / "audit"
    try:
        report = write_report(audits, out, args.tolerance)
    except Exception as error:  # exit 1 means a disagreement: a failure to report must not look like one
        print(f"fedrec audit: error: could not write the report to {out}: {error!r}", file=sys.stderr)
        return 2
    bad = sum(len(a.disagreements) for a in audits)
    checked = sum(a.checked for a in audits)
    print(f"{checked} epsilons checked, {bad} disagreement(s) above {args.tolerance:.0%}; report: {report}")
    return 1 if bad else 0


def fraction(text: str, one_allowed: bool) -> float:
    value = float(text)
    if not (0 < value <= 1 if one_allowed else 0 < value < 1):
        raise argparse.ArgumentTypeError(f"must be in (0, 1{']' if one_allowed else ')'}, not {text}")
    return value


def probability(text: str) -> float:
    return fraction(text, one_allowed=False)


def audit_delta(text: str) -> float:
    """[0, 1): delta 0 is the audit's standard case (a pure-epsilon claim)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {text}")
    return value


def sample_rate(text: str) -> float:
    """(0, 1]: rate 1 is a client whose one batch holds all its examples (no amplification)."""
    return fraction(text, one_allowed=True)


def cmd_certs(args: argparse.Namespace) -> int:
    from server.certificates import make_certificates

    paths = make_certificates(Path(args.out), args.nodes, args.host)
    for name, path in paths.items():
        print(f"{name:16} {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrec",
        description="Federated, privacy-preserving text-encoder recommender: the server side's tools. "
        "The federated run itself is a Flower app: `flwr run .`; a device's data directory: `fedrec-device "
        "prepare`; the centralized reference: `python -m simulations.centralized`.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="serve a trained model over gRPC (Recommend, Score, AddItems, health, reflection)",
        description="Serve the global model: loads the adapters file (a run's best_adapters.safetensors, "
        "or any file a run writes) and reloads it whenever it is rewritten.",
    )
    serve.add_argument("--checkpoint", required=True, help="adapters file (.safetensors) written by a run")
    add_data_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50051, help="port (default 50051; 0 picks a free one)")
    serve.set_defaults(func=cmd_serve)

    recommend = sub.add_parser("recommend", help="ask a running `fedrec serve` for recommendations")
    recommend.add_argument("--address", default="127.0.0.1:50051", help="host:port of the service")
    recommend.add_argument("--history", type=item_ids, default=[], help="item ids the user liked, oldest first: 1,50,172")
    recommend.add_argument("--profile", default="", help="the user's own words, e.g. 'I love space operas'")
    recommend.add_argument("-k", type=positive_int, default=10, help="how many items (default 10)")
    recommend.add_argument("--exclude", type=item_ids, default=[], help="item ids never to recommend")
    recommend.add_argument("--json", action="store_true", help="print JSON")
    recommend.set_defaults(func=cmd_recommend)

    deploy = sub.add_parser("deploy", help="deployment helpers (a device's data directory: `fedrec-device prepare`)")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    certs = deploy_sub.add_parser(
        "certs", help="create a CA, the SuperLink's TLS certificate and SuperNode key pairs",
        description="Writes ca.crt/ca.key, superlink.crt/superlink.key (signed by the CA) and nodes/node-<i> "
        "(OpenSSH private key) with nodes/node-<i>.pub (register it with `flwr supernode register`).",
    )
    certs.add_argument("--out", required=True, help="folder for the files")
    certs.add_argument("--nodes", type=positive_int, default=3, help="SuperNode key pairs to make (default 3)")
    certs.add_argument("--host", action="append", default=None,
                       help="name or IP the SuperLink is reached at (repeatable; default localhost and 127.0.0.1)")
    certs.set_defaults(func=cmd_certs)

    privacy = sub.add_parser("privacy", help="privacy calculator: epsilon, noise for a target, audit lower bound, "
                             "DP-FedAvg plan")
    privacy_sub = privacy.add_subparsers(dest="privacy_command", required=True)
    eps = privacy_sub.add_parser("epsilon", help="epsilon of DP-SGD / DP-FedAvg (Poisson-sampled Gaussian) or "
                                                 "DP-FTRL (--tree-rounds)")
    eps.add_argument("--noise-multiplier", type=positive_float, required=True)
    noise = privacy_sub.add_parser("noise", help="the noise multiplier that reaches a target epsilon")
    noise.add_argument("--epsilon", type=positive_float, required=True)
    for p in (eps, noise):
        p.add_argument("--sample-rate", type=sample_rate, required=True, help="Poisson sampling rate q, in (0, 1]")
        p.add_argument("--steps", type=positive_int, required=True, help="number of steps (or rounds)")
        p.add_argument("--delta", type=probability, required=True)
        p.add_argument("--accountant", choices=["rdp", "prv", "pld"], default="rdp",
                       help="rdp (Opacus), prv (Opacus) or pld (dp-accounting); default rdp")
        p.add_argument("--tree-rounds", type=positive_int, metavar="R",
                       help="DP-FTRL (server-dp-mechanism = \"dp-ftrl\"): --steps rounds in trees of R rounds, each "
                            "user in at most one round of a tree (R = N // C for N users, C a round); needs "
                            "--sample-rate 1 (no sampling assumed)")
        p.add_argument("--ftrl-noise", choices=["square-root", "tree"], default="square-root",
                       help="with --tree-rounds: DP-FTRL's dp-ftrl-noise (default square-root, as the run "
                            "config's)")
        p.set_defaults(func=cmd_privacy)
    bound = privacy_sub.add_parser(
        "lower-bound", help="empirical epsilon lower bound of a one-run canary audit (Steinke, Nasr, Jagielski 2023)")
    bound.add_argument("--canaries", type=positive_int, required=True, help="m: canaries, each included w.p. 1/2")
    bound.add_argument("--guesses", type=int, required=True, help="r: guesses made (the rest abstain)")
    bound.add_argument("--correct", type=int, required=True, help="v: correct guesses")
    bound.add_argument("--delta", type=audit_delta, required=True, help="delta of the claim, in [0, 1)")
    bound.add_argument("--confidence", type=probability, default=0.95, help="default 0.95")
    bound.set_defaults(func=cmd_privacy)
    add_plan_parser(privacy_sub)

    audit = sub.add_parser(
        "audit", help="recompute every epsilon in runs' privacy ledgers with an independent accountant",
        description="Reads RUN_DIR/privacy_ledger.jsonl of each run, recomputes every epsilon (and per-interaction "
        "epsilon) from the history before it with a second accountant, checks every entry against its budget "
        "and adaptive clipping's noise split (the total noise multiplier from its parts), and writes a Markdown report with plots. Exit codes: 0 clean; 1 an epsilon disagrees or a budget was "
        "overspent; 2 unreadable input (an empty or missing ledger, a line that is not a valid entry, a "
        "non-finite number), named by file and line.",
    )
    audit.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders of federated runs")
    audit.add_argument("--out", help="report folder (default: RUN_DIR/audit of the first run)")
    audit.add_argument("--tolerance", type=positive_float, default=0.01, help="relative tolerance (default 0.01)")
    audit.set_defaults(func=cmd_audit)
    return parser


PLAN_HELP = """\
For user-level DP-FedAvg (server-dp): every user is sampled each round with probability
q = C / N (Poisson, from the whole population: the amplification by sampling that the
accountant claims assumes it; devices that check in when they can are not such a sample),
the clipped updates (L2 norm <= S) are summed, N(0, z^2 S^2) is added per coordinate and
the sum is divided by C. How to read the output:
  noise multiplier z       the smallest z (rounded up) whose epsilon after T rounds is at most
                           --epsilon at --delta: run config server-dp-noise
  sampling rate q          C / N: run config server-dp-sample-rate
  epsilon of one round     what a single round spends (T rounds compose to --epsilon, far
                           less than T times this)
  adaptive clipping        with --count-noise sigma_b (server-dp-count-noise): the count of
                           unclipped updates is noised too, and the updates get the larger
                           noise multiplier z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2; the ledger
                           accounts z
  noise on the mean update std per coordinate z / C, and expected L2 norm z sqrt(P) / C, in
                           units of the clip norm S.
  signal to noise          the mean clipped update's norm (--signal, in units of S) over the
                           noise's: what decides quality. Users' updates disagree, so their
                           clipped mean is far below S: 0.11 S in the synthetic worlds with
                           the clip at the 5% quantile of the update norms, 0.05 S with a
                           clip above them all (python -m simulations.bench_update_norms
                           measures it). At 10,000 users the frontier kept 86% of the
                           model's lift over popularity at 0.9, 33% at 0.23 (docs/
                           benchmarks.md). Below 1, a round's update is mostly noise: grow
                           the cohort, train fewer rounds or fewer parameters, put the clip
                           nearer the update norms, or spend more epsilon.
  against the server       the server draws the sample, so against it there is no
                           amplification: with secure-aggregation = true it sees only sums of
                           noised updates, and a user's epsilon is a Gaussian's at rate 1 over
                           the rounds it took part in (here: at most the number shown, bound
                           from T and q; more only with probability a thousandth of delta,
                           which delta pays for); without secure aggregation the server
                           reads every update and no epsilon holds against it.
  DP-FTRL instead          the noise multipliers server-dp-mechanism = "dp-ftrl" needs for the
                           same epsilon, with dp-ftrl-noise = "tree" and then "square-root"
                           (the default: a smaller z): C clients a round, each at most once
                           in an epoch (tree) of floor(N / C) rounds, no sampling assumed (so
                           no amplification: usually far more noise; its noise on the model
                           grows with the log of the rounds in an epoch, not with the rounds),
                           and the square-root noise on one round's release against DP-FedAvg's.
                           FedAdam divides each step by the releases' RMS, which that noise
                           sets, so DP-FTRL wants a larger server-learning-rate than DP-FedAvg
                           at the same epsilon (10,000 users, epsilon 1, ratio 4.3: 0.12 beat
                           0.04 and 0.24; docs/benchmarks.md).
Example: fedrec privacy plan --users 100000 --cohort 1000 --rounds 1000 --epsilon 1 --delta 1e-6"""


def add_plan_parser(privacy_sub: argparse._SubParsersAction) -> None:
    from server.privacy_plan import SIGNAL

    plan = privacy_sub.add_parser(
        "plan", help="size a DP-FedAvg deployment: noise multiplier, sampling rate, noise on the mean update",
        description=PLAN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("--users", type=positive_int, required=True, help="N: users in the population (one a client)")
    plan.add_argument("--cohort", type=positive_float, required=True, help="C: expected clients a round (<= N)")
    plan.add_argument("--rounds", type=positive_int, required=True, help="T: rounds of training")
    plan.add_argument("--epsilon", type=positive_float, required=True, help="user-level epsilon after T rounds")
    plan.add_argument("--delta", type=probability, required=True, help="delta, in (0, 1); below 1 / N")
    plan.add_argument("--accountant", choices=["rdp", "prv", "pld"], default="rdp",
                      help="rdp (Opacus), prv (Opacus) or pld (dp-accounting); default rdp")
    plan.add_argument("--parameters", type=positive_int,
                      help="P: trainable parameters (default: counted on the model DP-FedAvg trains by default, "
                      "the light head without an id table)")
    plan.add_argument("--count-noise", type=positive_float, metavar="SIGMA_B",
                      help="adaptive clipping: std of the noise on the count (server-dp-count-noise; > z / 2)")
    plan.add_argument("--signal", type=positive_float, default=SIGNAL, metavar="S_FRACTION",
                      help=f"the mean clipped update's L2 norm in units of the clip (default {SIGNAL:g}: the "
                           "synthetic worlds' clients, clip at a low quantile of their update norms)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "deploy_command", None) == "certs" and not args.host:
        args.host = ["localhost", "127.0.0.1"]
    return run_command(args, "fedrec")


if __name__ == "__main__":
    sys.exit(main())

"""The ``adamkit`` command: argument parsing only; the work is in ``adamkit.bench.commands``.

Subcommands: train, bench, tune, landscape, report, results, speed, kernels. A subcommand's
parser may carry
``set_defaults(handler=...)``, a function that takes the parsed arguments and returns the exit status
(``speed`` does, with ``adamkit.bench.speed.run``); without a handler, ``main`` calls the function of
``adamkit.bench.commands`` named after the subcommand.
Exit status: 0 success, 1 some benchmark runs failed, 2 bad input (unknown name, invalid value,
missing data, unwritable output), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Compare the Adam family of optimizers on real training, offline.

  adamkit train --workload mlp-digits --optimizer adamw --lr 3e-3 --json run.json
  adamkit bench --suite quick --out runs/demo
  adamkit tune --workload logreg-digits --optimizers sgdm,adam,adamw --trials 30 --out runs/tune
  adamkit train --workload examples/my_workload.py:make --optimizer adamw
  adamkit landscape --function rosenbrock --optimizers adam,sgd,adabound --out rosenbrock.png
  adamkit report runs/demo
  adamkit results --out docs
  adamkit speed --shapes gpt2 --scale 0.25 --compare

`adamkit train --list` prints the workloads, optimizers and schedules."""

WORKLOAD_HELP = ("a built-in workload name (see adamkit train --list) or your own: path/to/file.py:make or "
                 "package.module:make, where make(seed) returns model, train_loader, val_loader and loss_fn "
                 "(see examples/my_workload.py)")

DATA_HELP = ("folder with the user-provided data sets: MNIST IDX files (train-images-idx3-ubyte[.gz], ...) "
             "and CIFAR-10's cifar-10-batches-py/ (default: $ADAMKIT_DATA_DIR or ~/.cache/adamkit/data)")


def _add_hyperparameters(parser: argparse.ArgumentParser, lr_help: str, description: str) -> None:
    group = parser.add_argument_group("optimizer hyperparameters", description)
    group.add_argument("--lr", type=float, help=lr_help)
    group.add_argument("--weight-decay", type=float, metavar="WD", help="weight_decay")
    group.add_argument("--betas", metavar="B1,B2", help="betas, e.g. 0.9,0.99")
    group.add_argument("--eps", metavar="EPS", help="eps (Adafactor takes a pair, e.g. none,1e-3)")
    group.add_argument("--momentum", type=float, help="momentum (SGD, RMSprop)")
    group.add_argument("--dampening", type=float, help="dampening (SGD)")
    group.add_argument("--nesterov", action="store_const", const=True, help="nesterov=True (SGD)")
    group.add_argument("--alpha", type=float, help="alpha (RMSprop)")
    group.add_argument("--centered", action="store_const", const=True, help="centered=True (RMSprop)")
    group.add_argument("--amsgrad", action="store_const", const=True, help="amsgrad=True (Adam, AdamW, AdaBelief)")
    group.add_argument("--final-lr", type=float, help="final_lr (AdaBound)")
    group.add_argument("--gamma", type=float, help="gamma (AdaBound)")
    group.add_argument("--amsbound", action="store_const", const=True, help="amsbound=True (AdaBound)")
    group.add_argument("--decoupled-weight-decay", action="store_const", const=True,
                       help="decoupled_weight_decay=True")
    group.add_argument("--hp", action="append", metavar="KEY=VALUE",
                       help="any constructor argument, repeatable: --hp beta3=0.999 --hp state_dtype=bfloat16 "
                            "(values: numbers, true/false, none, comma lists, text)")


def _add_common(parser: argparse.ArgumentParser, threads_help: str) -> None:
    parser.add_argument("--data-dir", default=None, metavar="DIR", help=DATA_HELP)
    parser.add_argument("--download", action="store_true",
                        help="download missing MNIST / CIFAR-10 files into --data-dir (needs a network)")
    parser.add_argument("--device", default="cpu",
                        help="torch device for model workloads (default: cpu; functions always run on the CPU)")
    parser.add_argument("--threads", type=int, metavar="N", help=threads_help)
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def _add_distributed(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group(
        "distributed", f"{what} through torch.distributed.run (torchrun): gloo on the CPU, nccl on CUDA. "
        "--batch-size stays the global batch; each rank trains on its slice of every batch. Logs come from "
        "rank 0; --checkpoint is a torch.distributed.checkpoint folder that --resume continues at any --nproc.")
    group.add_argument("--nproc", type=int, metavar="N", help="processes (ranks) per node")
    group.add_argument("--strategy", choices=["ddp", "zero", "fsdp2"],
                       help="ddp: DistributedDataParallel (default); zero: DDP with ZeroRedundancyOptimizer "
                            "(sharded optimizer state); fsdp2: fully_shard (sharded parameters, DTensor)")
    group.add_argument("--nnodes", type=int, default=1, help="machines (default 1), as torchrun's --nnodes")
    group.add_argument("--node-rank", type=int, default=0, help="this machine's rank (default 0)")
    group.add_argument("--master-addr", metavar="HOST", help="address of node 0 (default 127.0.0.1)")
    group.add_argument("--master-port", type=int, metavar="PORT",
                       help="free port on node 0 (default: a free port on one node, 29500 on several)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adamkit", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # train ----------------------------------------------------------------------------------
    train = sub.add_parser(
        "train", help="train one workload with one optimizer",
        description="Train one workload with one optimizer, evaluating on a held-out split. Writes TensorBoard "
                    "scalars (--logdir), a JSON summary (--json) and atomic checkpoints (--checkpoint).")
    train.add_argument("--workload", "-w", help=WORKLOAD_HELP)
    train.add_argument("--optimizer", "-o", default="adam", help="optimizer name (default: adam; see --list)")
    train.add_argument("--list", action="store_true", help="list workloads, optimizers and schedules, then exit")
    _add_hyperparameters(
        train, "learning rate (default: the workload's prescribed one, else the optimizer's)",
        "Only the values given are passed to the optimizer; its own defaults apply to the rest. "
        "An unknown argument or an invalid value stops with a message (the optimizer's own for values).")
    sched = train.add_argument_group("learning-rate schedule")
    sched.add_argument("--schedule", metavar="NAME",
                       help="a schedule from adamkit.schedules (default: the workload's, usually none)")
    sched.add_argument("--schedule-arg", action="append", metavar="KEY=VALUE",
                       help="schedule argument, repeatable; total_steps defaults to the run's steps and a "
                            "required warmup_steps to 5%% of them")
    budget = train.add_argument_group("budget and data")
    steps = budget.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help="optimizer steps (default: the workload's budget)")
    steps.add_argument("--epochs", type=float, help="passes over the training set (model workloads)")
    budget.add_argument("--batch-size", type=int, help="mini-batch size (default: the workload's)")
    budget.add_argument("--seed", type=int, default=0, help="seed of initialisation, batch order, dropout (default 0)")
    budget.add_argument("--init", default="default", choices=["default", "xavier", "kaiming", "orthogonal"],
                        help="re-initialise Linear/Conv weights (default: the model's own)")
    budget.add_argument("--param-groups", action="store_true",
                        help="no weight decay on biases and normalisation weights (adamkit.param_groups)")
    budget.add_argument("--data", metavar="FILE", help="charlm: train on this text file instead of the stdlib source")
    budget.add_argument("--eval-every", type=int, metavar="N", help="evaluate every N steps (default: ~20 per run)")
    out = train.add_argument_group("output")
    out.add_argument("--logdir", metavar="DIR", help="TensorBoard scalars: losses, metrics, lr, gradient norm, "
                     "per-layer update/weight ratio, effective per-element step size")
    out.add_argument("--json", metavar="FILE", help="write the run summary as JSON")
    out.add_argument("--checkpoint", metavar="FILE", help="checkpoint file (written atomically)")
    out.add_argument("--checkpoint-every", type=int, metavar="N", help="checkpoint every N steps (and at the end)")
    out.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    _add_common(train, "torch intra-op threads (default: torch's choice)")
    _add_distributed(train, "Train with N processes per node")

    # bench ----------------------------------------------------------------------------------
    bench = sub.add_parser(
        "bench", help="compare optimizers on a suite of workloads",
        description="Compare optimizers fairly: a learning-rate sweep per optimizer and workload (unless --lr), "
                    "then every seed at the best value. Appends to DIR/results.jsonl, logs to DIR/tb/, prints "
                    "leaderboards and writes DIR/report.md and DIR/report.html. Rerunning with the same --out "
                    "skips finished runs.")
    bench.add_argument("--suite", choices=["quick", "full", "paper"],
                       help="quick (default): 6 offline workloads, 6 optimizers, 2 seeds, minutes; full: every "
                            "offline workload incl. charlm, every dense optimizer, 5 seeds; paper: MNIST and "
                            "CIFAR-10 (needs --data-dir)")
    bench.add_argument("--workloads", metavar="A,B",
                       help="workloads instead of the suite's (the suite still sets the other defaults); built-in "
                            "names or your own FILE.py:make / package.module:make")
    bench.add_argument("--optimizers", metavar="A,B", help="optimizers instead of the suite's")
    bench.add_argument("--seeds", metavar="N|A,B", help="number of seeds (from 0) or a list of seeds")
    bench.add_argument("--out", metavar="DIR", help="output folder (default: runs/<suite>)")
    _add_hyperparameters(
        bench, "fix the learning rate for every optimizer (no sweep)",
        "Each value is passed to every chosen optimizer that has that argument; their own defaults apply to "
        "the rest. An invalid value stops with the optimizer's own message before any training.")
    bench.add_argument("--steps", type=int, help="budget for every workload instead of its own")
    bench.add_argument("--batch-size", type=int, help="batch size for every model workload")
    bench.add_argument("--sweep-points", type=int, default=5, help="learning rates per sweep (default 5)")
    bench.add_argument("--sweep-fraction", type=float,
                       help="fraction of the budget a sweep run trains (default: the suite's, 0.25 or 0.1)")
    bench.add_argument("--jobs", "-j", type=int, metavar="N",
                       help="runs in N parallel worker processes (default: the number of CPUs, at most 4; "
                            "1 runs everything in this process)")
    bench.add_argument("--no-report", action="store_true", help="skip report.md / report.html")
    _add_common(bench, "torch intra-op threads per run (default 1: small models run best on one thread "
                       "per process)")
    bench_dist = bench.add_argument_group("distributed", "Run every training run with N local processes through "
                                          "torch.distributed.run (one run at a time; --jobs does not apply).")
    bench_dist.add_argument("--nproc", type=int, metavar="N", help="ranks per run")
    bench_dist.add_argument("--strategy", choices=["ddp", "zero", "fsdp2"], help="ddp (default), zero or fsdp2")

    # tune -----------------------------------------------------------------------------------
    tune = sub.add_parser(
        "tune", help="Bayesian hyperparameter search per optimizer (Optuna)",
        description="Tune each optimizer's hyperparameters on one workload with Optuna: one study per optimizer, "
                    "named WORKLOAD:OPTIMIZER, in DIR/study.db (SQLite) or --storage URL. Rerunning the same "
                    "command continues the studies until each has --trials finished (complete or pruned) "
                    "trials; trials of a killed process are marked failed. Prints a table and writes "
                    "DIR/report.md, DIR/report.html and DIR/figures/tune-*.png. Needs the [tune] extra.",
        epilog="Search spaces are declared per optimizer (see adamkit.bench.optimizers.SEARCH_SPACES): lr "
               "log-uniform over [default/100, default*100], one_minus_beta1/one_minus_beta2 (1 - beta, log scale), "
               "weight_decay log-uniform with a switch for 0 (weight_decay_on), eps, and each optimizer's own "
               "knobs. Example: adamkit tune --workload logreg-digits --optimizers sgdm,adam,adamw --trials 30 "
               "--out runs/tune")
    tune.add_argument("--workload", "-w", help=WORKLOAD_HELP)
    tune.add_argument("--optimizers", "-o", required=True, metavar="A,B", help="optimizers to tune, one study each")
    tune.add_argument("--trials", type=int, default=30,
                      help="finished (complete or pruned) trials per study, counting every process's (default 30)")
    tune.add_argument("--out", required=True, metavar="DIR", help="report folder; the studies are in DIR/study.db "
                      "unless --storage")
    tune.add_argument("--storage", metavar="URL",
                      help="any Optuna RDB URL (sqlite:///FILE.db, postgresql://USER:PASSWORD@HOST:PORT/DB, "
                           "mysql+pymysql://...) or journal:FILE; several adamkit tune processes, on several "
                           "machines, can share one")
    search = tune.add_argument_group("search")
    search.add_argument("--space", action="append", metavar="KEY=LOW:HIGH[:log]",
                        help="search KEY between LOW and HIGH instead of the declared range (repeatable); beta1=0.8:0.99 "
                             "bounds beta1 itself (searched as 1 - beta1), schedule.KEY searches a --schedule "
                             "argument (integers if both bounds are)")
    search.add_argument("--fix", action="append", metavar="KEY=VALUE",
                        help="fix a hyperparameter instead of searching it (repeatable): --fix weight_decay=0 "
                             "--fix backend=reference")
    search.add_argument("--schedule", metavar="NAME", help="a learning-rate schedule from adamkit.schedules")
    search.add_argument("--schedule-arg", action="append", metavar="KEY=VALUE", help="fixed schedule argument")
    search.add_argument("--sampler", default="tpe", choices=["tpe", "gp", "random", "qmc"],
                        help="tpe (default: multivariate TPE), gp (Gaussian process), random, qmc (Sobol)")
    search.add_argument("--seed", type=int, help="sampler seed: the same seed gives the same trials in one process "
                        "(worker K uses seed + K)")
    search.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"],
                        help="stop unpromising trials from their intermediate held-out metric (default: median)")
    search.add_argument("--metric", default="loss",
                        help="the objective: a held-out metric at the end of the budget (default loss; accuracy, "
                             "precision, recall and f1 are maximized, every other metric minimized)")
    search.add_argument("--max-failures", type=int, metavar="N",
                        help="stop a study after N failed trials (default: --trials)")
    run = tune.add_argument_group("runs")
    run.add_argument("--steps", type=int, help="budget of every trial (default: the workload's)")
    run.add_argument("--train-seed", type=int, default=0, help="training seed of every trial (default 0)")
    run.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    run.add_argument("--rerun-best", type=int, default=0, metavar="S",
                     help="train each optimizer's best configuration with S seeds through the bench runner "
                          "(DIR/rerun-best/results.jsonl, read by adamkit report)")
    run.add_argument("--no-report", action="store_true", help="skip report.md / report.html")
    _add_common(tune, "torch intra-op threads per trial (default 1)")

    # landscape ------------------------------------------------------------------------------
    landscape = sub.add_parser(
        "landscape", help="draw optimizer trajectories on a 2-D function",
        description="Draw each optimizer's trajectory over the contour plot of a 2-D test function: one PNG, "
                    "one panel per optimizer, each at its best learning rate from a sweep.")
    landscape.add_argument("--function", "-f", default="rosenbrock", help="rosenbrock (default), beale or rastrigin")
    landscape.add_argument("--optimizers", default="adam,sgd,adabound", metavar="A,B",
                           help="optimizers to draw (default: adam,sgd,adabound)")
    landscape.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    landscape.add_argument("--steps", type=int, help="steps per trajectory (default: the function's budget, 1000)")
    landscape.add_argument("--lr", type=float, help="use this learning rate for every optimizer (no sweep)")
    landscape.add_argument("--sweep-points", type=int, default=5, help="learning rates per sweep (default 5)")
    landscape.add_argument("--json", metavar="FILE", help="also write the chosen learning rates and final values")
    landscape.add_argument("--quiet", "-q", action="store_true", help="no progress output")

    # report ---------------------------------------------------------------------------------
    report = sub.add_parser(
        "report", help="regenerate a bench report from DIR/results.jsonl",
        description="Regenerate DIR/report.md, DIR/report.html and DIR/figures/*.png from DIR/results.jsonl "
                    "and print the leaderboards.")
    report.add_argument("dir", metavar="DIR", help="a bench output folder")
    report.add_argument("--quiet", "-q", action="store_true", help="print only the leaderboards")

    # results --------------------------------------------------------------------------------
    results = sub.add_parser(
        "results", help="measure the claims about Adam and its family; write OUT/RESULTS.md",
        description="Run a fixed set of experiments on the built-in offline workloads, one per claim (speed of "
                    "convergence, learning-rate sensitivity, decoupled weight decay, AMSGrad, warm-up, AdaBound, "
                    "sparse gradients, memory), and write OUT/RESULTS.md with figures in OUT/results-figures/: "
                    "per claim the experiment, a figure, a table over seeds and a verdict computed by a stated "
                    "rule. Runs are recorded in OUT/results-runs/results.jsonl; a rerun reuses them, so an "
                    "interrupted run continues.")
    results.add_argument("--out", default="docs", metavar="DIR", help="output folder (default: docs)")
    results.add_argument("--scale", default="default", choices=["default", "full", "test"],
                         help="default: what docs/RESULTS.md shows (38 minutes on 2 busy CPU cores, less on idle "
                              "ones); full: more seeds, longer budgets; "
                              "test: a few seconds of training, for the tests only (its verdicts mean nothing)")
    results.add_argument("--jobs", "-j", type=int, default=2, metavar="N",
                         help="runs in N parallel worker processes (default 2; 1 runs everything in this process)")
    results.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads per run (default 1)")
    results.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    results.set_defaults(handler=_results)

    # speed ----------------------------------------------------------------------------------
    from adamkit.bench import speed as speed_module
    speed = sub.add_parser(
        "speed", help="time every optimizer's step on a realistic parameter set",
        description="Time optimizer.step() on GPT-2, ResNet-18 or uniform tensor shapes: ms/step, "
                    "million params/s, the bytes each algorithm must move, effective GB/s, the "
                    "floor (the time those bytes need at this machine's measured read and "
                    "write-back bandwidth; % floor = floor / step time, 100 at the memory "
                    "limit, for parameter sets larger than the caches), the ratio to "
                    "torch.optim.AdamW(fused=True) timed side by side (their steps alternate on "
                    "the same parameters), and state bytes per parameter. The first lines are the "
                    "machine's measured copy and read bandwidth.")
    speed_module.add_arguments(speed)
    speed.set_defaults(handler=speed_module.run)

    # kernels --------------------------------------------------------------------------------
    from adamkit.bench import kernels as kernels_module
    kernels = sub.add_parser(
        "kernels", help="compile every GPU kernel ahead of time; registers and spills",
        description="Compile, ahead of time and without a GPU, every Triton kernel that the "
                    "optimizers x parameter dtypes x state storages need, and print one row per "
                    "kernel: rule, configuration, registers, spills, shared memory, compile "
                    "time. Exit status 1 if any kernel fails to compile.")
    kernels_module.add_arguments(kernels)
    kernels.set_defaults(handler=kernels_module.main)
    return parser


def _results(args) -> int:
    from adamkit.bench.results import ResultsConfig, run_results
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    command = f"adamkit results --out {args.out} --scale {args.scale} --jobs {args.jobs}"
    try:
        result = run_results(ResultsConfig(out=args.out, scale=args.scale, jobs=args.jobs, threads=args.threads,
                                           command=command), log=log)
    except KeyboardInterrupt:
        print(f"\nadamkit results: interrupted; finished runs are in {args.out}/results-runs/results.jsonl. "
              "Rerun the same command to continue.", file=sys.stderr)
        return 130
    print(result["verdict_table"])
    log(f"{result['completed']} run(s) done, {result['skipped']} reused, {result['elapsed_s'] / 60:.1f} min; "
        f"wrote {result['markdown']} and {len(result['figures'])} figures")
    if result["failures"]:
        print(f"adamkit results: {len(result['failures'])} run(s) failed:", file=sys.stderr)
        for failure in result["failures"]:
            print("  " + failure, file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]  # after the subcommand: what --nproc relaunches
    if args.command is None:
        parser.print_help()
        return 2
    from adamkit.bench import commands
    from adamkit.bench.errors import UsageError
    if getattr(args, "data_dir", None) is None and hasattr(args, "data_dir"):
        from adamkit.bench.data import DEFAULT_DATA_DIR
        args.data_dir = DEFAULT_DATA_DIR
    handler = getattr(args, "handler", None) or getattr(commands, args.command)
    try:
        return handler(args)
    except UsageError as error:
        print(f"adamkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nadamkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""What each ``adamkit`` subcommand does with its parsed arguments (``adamkit.cli`` only parses).

Every function returns the process exit status: 0 on success, 1 when some bench runs failed.
Bad input raises UsageError, which the command line reports with exit status 2.
"""
from __future__ import annotations

import json
import sys

from .errors import UsageError

# Flags of `adamkit train` / `bench` that map onto optimizer constructor arguments.
HYPERPARAMETER_FLAGS = ("lr", "weight_decay", "betas", "eps", "momentum", "dampening", "nesterov", "alpha",
                        "centered", "amsgrad", "final_lr", "gamma", "amsbound", "decoupled_weight_decay")


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UsageError(f"expected a comma-separated list of names, got {text!r}")
    return names


def _seeds(text: str | None) -> list[int] | None:
    """``"3"`` means seeds 0, 1, 2; ``"0,5,7"`` means exactly those."""
    if text is None:
        return None
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        count = int(text)
    except ValueError:
        raise UsageError(f"--seeds expects a count or a comma-separated list of integers, got {text!r}") from None
    if count < 1:
        raise UsageError(f"--seeds must be at least 1, got {count}")
    return list(range(count))


def hyperparameters_from(args) -> dict:
    """The hyperparameters the user set: the dedicated flags, then ``--hp KEY=VALUE`` (which wins)."""
    from .optimizers import parse_assignments, parse_value
    values = {}
    for name in HYPERPARAMETER_FLAGS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in ("betas", "eps"):  # given as text: "0.9,0.99", "1e-8" or Adafactor's "none,1e-3"
            value = parse_value(value)
        values[name] = value
    values.update(parse_assignments(getattr(args, "hp", None)))
    return values


def default_jobs() -> int:
    """Worker processes for ``adamkit bench``: one per CPU, at most 4."""
    import os
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, count))


def _log(quiet: bool):
    if quiet:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)


def list_names() -> str:
    from . import optimizers, runner, workloads
    lines = ["workloads:"]
    for workload in workloads.WORKLOADS.values():
        needs = f" [needs --data-dir: {workload.data}]" if workload.data else ""
        lines.append(f"  {workload.name:18s} {workload.summary}{needs}")
    lines.append("optimizers:")
    for name in optimizers.names():
        spec = optimizers.resolve(name)
        lines.append(f"  {name:18s} " + ("" if spec.base == name else spec.describe()))
    lines.append("schedules:")
    lines.append("  " + ", ".join(runner.schedule_names()))
    return "\n".join(line.rstrip() for line in lines)


def train(args) -> int:
    from .optimizers import parse_assignments
    from .runner import TrainConfig, format_summary, run_training
    if args.list:
        print(list_names())
        return 0
    if not args.workload:
        raise UsageError("--workload is required (see --list for the names)")
    config = TrainConfig(
        workload=args.workload, optimizer=args.optimizer, hyperparameters=hyperparameters_from(args),
        schedule=args.schedule, schedule_args=parse_assignments(args.schedule_arg, "--schedule-arg"),
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, init=args.init,
        param_groups=args.param_groups, logdir=args.logdir, json_path=args.json, checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every, resume=args.resume, quiet=args.quiet, data_dir=args.data_dir,
        data_file=args.data, download=args.download, device=args.device, eval_every=args.eval_every,
        threads=args.threads,
    )
    from . import launch
    if launch.wanted(args):  # N ranks through torch.distributed.run, each running this command
        return launch.launch_train(args, config)
    summary = run_training(config)
    if not args.quiet and summary.get("world_size", 1) > 1 and not launch.is_main_rank():
        return 0  # the other ranks: rank 0 prints
    if not args.quiet:
        print(format_summary(summary))
    return 0


def bench(args) -> int:
    from .report import format_leaderboard, generate
    from .suite import BenchConfig, run_bench
    log = _log(args.quiet)
    hyperparameters = hyperparameters_from(args)
    lr = hyperparameters.pop("lr", None)
    suite = args.suite or "quick"
    out = args.out or f"runs/{suite}"
    config = BenchConfig(
        out=out, suite=suite, workloads=_names(args.workloads), optimizers=_names(args.optimizers),
        seeds=_seeds(args.seeds), lr=lr, hyperparameters=hyperparameters, steps=args.steps,
        batch_size=args.batch_size, sweep_points=args.sweep_points, sweep_fraction=args.sweep_fraction,
        jobs=args.jobs if args.jobs is not None else default_jobs(), threads=args.threads or 1,
        data_dir=args.data_dir, download=args.download, device=args.device,
        quiet=args.quiet, report=not args.no_report, nproc=args.nproc, strategy=args.strategy,
    )
    try:
        result = run_bench(config, log=log)
    except KeyboardInterrupt:
        print(f"\nadamkit bench: interrupted; finished runs are in {out}/results.jsonl. "
              "Rerun the same command to continue.", file=sys.stderr)
        return 130
    log(f"{result['completed']} run(s) done, {result['skipped']} already in {out} skipped, "
        f"{result['elapsed_s']:.1f} s")
    if config.report:
        paths = generate(out, log=log)
        print(paths["leaderboard"])
        log(f"report: {paths['markdown']} and {paths['html']}")
    else:
        print(format_leaderboard(result["records"]))
    if result["failures"]:
        print(f"adamkit bench: {len(result['failures'])} run(s) failed:", file=sys.stderr)
        for failure in result["failures"]:
            print("  " + failure, file=sys.stderr)
        return 1
    return 0


def landscape(args) -> int:
    from .landscape import run_landscape
    result = run_landscape(args.function, _names(args.optimizers), args.out, steps=args.steps, lr=args.lr,
                           sweep_points=args.sweep_points, log=_log(args.quiet))
    if args.json:
        from .runner import write_text_atomic
        payload = {name: {"lr": r["lr"], "final": r["final"] if r["final"] != float("inf") else None,
                          "final_point": [float(v) for v in r["points"][-1]],
                          "sweep": {f"{k:g}": (v if v != float("inf") else None) for k, v in r["sweep"].items()}}
                   for name, r in result.items()}
        write_text_atomic(json.dumps({"function": args.function, "optimizers": payload}, indent=2) + "\n", args.json)
    if not args.quiet:
        print(f"wrote {args.out}")
    return 0


def report(args) -> int:
    from .report import generate
    paths = generate(args.dir, log=_log(args.quiet))
    print(paths["leaderboard"])
    if not args.quiet:
        print(f"report: {paths['markdown']} and {paths['html']} ({len(paths['figures'])} figures)", file=sys.stderr)
    return 0


def tune(args) -> int:
    from .optimizers import parse_assignments
    from .tune import TuneConfig, run_tune
    if not args.workload:
        raise UsageError("--workload is required: a built-in name (adamkit train --list) or FILE.py:make")
    config = TuneConfig(
        workload=args.workload, optimizers=_names(args.optimizers) or [], trials=args.trials, out=args.out,
        storage=args.storage, sampler=args.sampler, seed=args.seed, pruner=args.pruner, metric=args.metric,
        space=list(args.space or []), fix=list(args.fix or []), schedule=args.schedule,
        schedule_args=parse_assignments(args.schedule_arg, "--schedule-arg"), steps=args.steps,
        train_seed=args.train_seed, workers=args.workers, threads=args.threads or 1, max_failures=args.max_failures,
        device=args.device, data_dir=args.data_dir, download=args.download, quiet=args.quiet, rerun_best=args.rerun_best,
        report=not args.no_report,
    )
    try:
        result = run_tune(config)
    except KeyboardInterrupt:
        print(f"\nadamkit tune: interrupted; finished trials are in {config.storage or config.out + '/study.db'}. "
              "Rerun the same command to continue.", file=sys.stderr)
        return 130
    print(result["table"])
    log = _log(args.quiet)
    log(f"{result['elapsed_s']:.1f} s; studies in {result['storage']}")
    if "report" in result:
        log(f"report: {result['report']['markdown']} and {result['report']['html']} "
            f"({len(result['report']['figures'])} figures)")
    if result.get("rerun"):
        log(f"best configurations rerun: {result['rerun']['out']}/results.jsonl")
        if result["rerun"]["failures"]:
            print(f"adamkit tune: {len(result['rerun']['failures'])} rerun(s) failed:", file=sys.stderr)
            for failure in result["rerun"]["failures"]:
                print("  " + failure, file=sys.stderr)
            return 1
    return 0

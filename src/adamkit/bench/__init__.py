"""The adamkit harness: workloads, training runs, benchmarks, reports and plots.

The harness is built on top of the library and is never imported by it. Its heavy dependencies
(scikit-learn, matplotlib, TensorBoard, tqdm; the ``[bench]`` extra) are imported only where used.

Modules:
  workloads   the registry of named workloads (model or function, data, loss, metrics, budget)
  data        offline data sets, MNIST IDX / CIFAR-10 readers and the optional downloader
  models      the networks used by the workloads
  functions   2-D test functions, the ill-conditioned quadratic and Reddi et al.'s online problem
  metrics     classification metrics
  optimizers  optimizer names (library names plus a few named variants) and hyperparameter parsing
  runner      one training run (``adamkit train``): logging, checkpoints, resume, JSON summary
  suite       the benchmark protocol (``adamkit bench``): sweeps, seeds, results.jsonl
  report      leaderboard, report.md / report.html and figures (``adamkit report``)
  landscape   optimizer trajectories over a 2-D function's contour plot (``adamkit landscape``)
  commands    what each subcommand does with its parsed arguments (``adamkit.cli`` only parses)
  speed       the optimizer-step speed benchmark (``adamkit speed``; its own module)
"""

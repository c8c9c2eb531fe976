"""``moco bench ...``: benchmarks that print JSON with a ``ratio`` against a baseline.

Added to the ``moco`` command by ``benchmarks/entry_point.py``; ``pipelines`` does not know of it.
"""

from __future__ import annotations

import argparse

from pipelines.cli_common import UserError, positive_float, positive_int


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    bench = commands.add_parser("bench", help="benchmarks that print JSON with a 'ratio' against a baseline")
    benches = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    _add_step(benches, common)
    _add_ingest(benches, common)
    _add_train(benches, common)
    _add_plan(benches, common)
    _add_probe(benches, common)

    def missing(args: argparse.Namespace) -> dict:
        bench.print_help()
        raise UserError("choose a benchmark, e.g. 'moco bench step'")

    bench.set_defaults(handler=missing)


def _add_step(benches: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = benches.add_parser(
        "step",
        parents=[common],
        help="MoCo vs supervised training-step throughput and EMA update time",
        description="Measure supervised and MoCo training steps on the same backbone, batch and threads "
        "(ideal MoCo/supervised ratio ~0.75 by FLOPs) and the momentum-update time.",
    )
    parser.add_argument("--arch", default="resnet18", help="torchvision backbone (default: resnet18)")
    parser.add_argument("--image-size", type=positive_int, default=64, help="input resolution in px (default: 64)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per step (default: 256)")
    parser.add_argument(
        "--queue-sizes",
        type=positive_int,
        nargs="+",
        default=[4096, 65536],
        help="MoCo queue sizes K to time; the first gives the ratio (default: 4096 65536)",
    )
    parser.add_argument(
        "--batchnorm",
        default="split",
        choices=["split", "none", "shuffle"],
        help="BatchNorm mode of the MoCo step (default: split, the single-process mode)",
    )
    parser.add_argument("--bn-splits", type=positive_int, default=8, help="sub-batches for split BN (default: 8)")
    parser.add_argument("--small-image-stem", action="store_true", help="use the 3x3 stride-1 CIFAR stem")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="both sides under torch.compile (supervised model; MoCo's encoders, as training.compile does); "
        "compilation happens in the warm-up steps",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (default: 2)")
    parser.add_argument(
        "--steps", type=positive_int, default=3, help="timed steps per configuration and round (default: 3)"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=3, help="interleaved timing rounds; the median is reported (default: 3)"
    )
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 (no autocast, NCHW) comparison")
    parser.add_argument(
        "--ema-archs",
        nargs="*",
        default=["resnet18", "resnet50"],
        help="backbones for the EMA timing (default: resnet18 resnet50)",
    )
    parser.set_defaults(handler=_run_step)


def _run_step(args: argparse.Namespace) -> dict:
    from benchmarks.bench_step import run_step_benchmark

    return run_step_benchmark(
        arch=args.arch,
        image_size=args.image_size,
        batch_size=args.batch_size,
        queue_sizes=args.queue_sizes,
        batchnorm=args.batchnorm,
        bn_splits=args.bn_splits,
        small_image_stem=args.small_image_stem,
        threads=args.threads,
        device=args.device,
        warmup=args.warmup,
        steps=args.steps,
        rounds=args.rounds,
        include_fp32=not args.no_fp32,
        ema_archs=args.ema_archs,
        compile=args.compile,
    )


def _add_ingest(benches: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = benches.add_parser(
        "ingest",
        parents=[common],
        help="images/s into the training loop: official loader vs our function vs our Ray pipeline",
        description="Build (or reuse) an ImageNet-like JPEG corpus and its shards, then measure images/s "
        "delivered by (a) the official ImageFolder + DataLoader + TwoCropsTransform loader, (b) our per-image "
        "decode + two-view function in one process, (c) our Ray Data pipeline into iter_torch_batches. "
        "ratio = (c)/(a); efficiency = (c)/((b) x workers).",
    )
    parser.add_argument(
        "--work-dir", default=None, help="where the corpus and shards are kept (default: <tmp>/moco-bench)"
    )
    parser.add_argument("--num-images", type=positive_int, default=2000, help="corpus size (default: 2000)")
    parser.add_argument(
        "--sizes", type=positive_int, nargs="+", default=[224, 64], help="view sizes in px (default: 224 64)"
    )
    parser.add_argument(
        "--workers", type=positive_int, default=2, help="loader workers / Ray reader tasks (default: 2)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=256, help="batch size (default: 256)")
    parser.add_argument("--epochs", type=positive_int, default=3, help="epochs per measurement (default: 3)")
    parser.add_argument(
        "--single-process-images",
        type=positive_int,
        default=300,
        help="images timed for the single-process figure (default: 300)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="interleaved rounds of every measurement; figures are the medians of the rounds (default: 1)",
    )
    parser.set_defaults(handler=_run_ingest)


def _run_ingest(args: argparse.Namespace) -> dict:
    from benchmarks.bench_ingest import run_ingest_benchmark

    return run_ingest_benchmark(
        work_dir=args.work_dir,
        num_images=args.num_images,
        sizes=tuple(args.sizes),
        workers=args.workers,
        batch_size=args.batch_size,
        epochs=args.epochs,
        single_process_images=args.single_process_images,
        repeats=args.repeats,
    )


def _add_train(benches: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = benches.add_parser(
        "train",
        parents=[common],
        help="the Ray Train pretraining job vs training loops without Ray, same work",
        description="At each view size and trainer CPU count, with the same model, MoCo v2 augmentation, batch "
        "and trainer threads, "
        "measure images/s of: train_step on precomputed views (the ceiling), train_step fed by a DataLoader "
        "with one worker (bare_loop; bare_loop_reuse: with the job's training.host_allocator), a single process "
        "applying torchvision's official transforms per image, and the "
        "moco pretrain Ray Train job (1 worker, reader lanes on the CPUs left). Same statistic everywhere: "
        "images/s over the same steps after the warm-up; wall_s includes start-up. ratios = job / baseline "
        "(medians); paired_ratios = the median over rounds of each round's job / that round's baseline.",
    )
    parser.add_argument(
        "--work-dir", default=None, help="where the corpora and shards are kept (default: <tmp>/moco-bench)"
    )
    parser.add_argument(
        "--num-images", type=positive_int, default=2000, help="ImageNet-like corpus size (default: 2000)"
    )
    parser.add_argument(
        "--sizes",
        type=positive_int,
        nargs="+",
        default=[32, 64],
        help="view sizes in px; 32 and below use 32 px photo crops, larger ones ImageNet-like JPEGs (default: 32 64)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="batch size at every size (default: 128 at 32 px, 64 at 64 px, 32 at 224 px)",
    )
    parser.add_argument("--steps", type=positive_int, default=60, help="timed steps (default: 60)")
    parser.add_argument(
        "--warmup", type=positive_int, default=10, help="untimed steps first; also the job's log window (default: 10)"
    )
    parser.add_argument(
        "--trainer-cpus",
        type=positive_float,
        nargs="+",
        default=[1.0],
        metavar="CPUS",
        help="CPUs the job's trainer reserves (scaling.cpus_per_worker), one comparison each: the loops train on "
        "the job's torch threads (CPUS rounded up), the reader lanes get the CPUs left (default: 1; e.g. 1 1.5 "
        "on 2 cores adds the demo recipe's setting: 2 torch threads, the lane on the half CPU left)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="interleaved rounds of every path; figures are the medians of the rounds (default: 1)",
    )
    parser.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> dict:
    from benchmarks.bench_train import run_train_benchmark

    return run_train_benchmark(
        work_dir=args.work_dir,
        num_images=args.num_images,
        sizes=tuple(args.sizes),
        batch_sizes={size: args.batch_size for size in args.sizes} if args.batch_size else None,
        steps=args.steps,
        warmup=args.warmup,
        trainer_cpus=tuple(args.trainer_cpus),
        repeats=args.repeats,
    )


def _add_plan(benches: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = benches.add_parser(
        "plan",
        parents=[common],
        help="planning time, driver memory and time to the first batch for 1M-100M image collections",
        description="Build (once) synthetic moco-shard collections of tiny images and, for each size, measure in "
        "a fresh process: planning from the manifest (time, peak memory), the time to the first training batch, "
        "and, as the baseline, planning the same files by reading every Parquet footer. ratio = footer planning "
        "time / manifest planning time at the largest size.",
    )
    parser.add_argument("--work-dir", default=None, help="where the collections are kept (default: <tmp>/moco-bench)")
    parser.add_argument(
        "--sizes",
        type=positive_int,
        nargs="+",
        default=[1_000_000, 10_000_000, 100_000_000],
        help="collection sizes in images (default: 1000000 10000000 100000000; 100M takes ~2 GB of disk)",
    )
    parser.add_argument("--no-footers", action="store_true", help="skip the footer-reading baseline")
    parser.set_defaults(handler=_run_plan)


def _run_plan(args: argparse.Namespace) -> dict:
    from benchmarks.bench_plan import run_plan_benchmark

    return run_plan_benchmark(work_dir=args.work_dir, sizes=tuple(args.sizes), footers=not args.no_footers)


def _add_probe(benches: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = benches.add_parser(
        "probe",
        parents=[common],
        help="cached linear probe vs the full protocol: accuracy and wall time, same backbone, data, settings",
        description="Run moco probe --mode full and --mode cached (and cached again, features reused) on the demo's "
        "photo crops with the same backbone and lincls hyperparameters; report top-1/top-5 of each, their "
        "difference, and ratio = full seconds / cached seconds.",
    )
    parser.add_argument("--work-dir", default=None, help="where the data is kept (default: <tmp>/moco-bench)")
    parser.add_argument("--backbone", metavar="SOURCE", help="weights to probe (default: a random-init resnet18)")
    parser.add_argument(
        "--epochs", type=positive_int, default=10, help="epochs; milestones at 60%% and 80%% (default: 10)"
    )
    parser.add_argument(
        "--cpus-per-worker", type=float, default=1.5, help="CPUs of the full probe's worker (default: 1.5)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="probe config key"
    )
    parser.set_defaults(handler=_run_probe)


def _run_probe(args: argparse.Namespace) -> dict:
    from benchmarks.bench_probe import run_probe_benchmark

    return run_probe_benchmark(args.work_dir, args.backbone, args.epochs, args.overrides, args.cpus_per_worker)

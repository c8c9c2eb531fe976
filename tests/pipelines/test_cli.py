"""The moco command line: version, help, JSON on the last line, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.entry_point import main
from pipelines import cli

ROOT = Path(__file__).resolve().parents[2]


def _run(module: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=ROOT)


def test_version_and_help():
    out = _run("benchmarks.entry_point", "--version")
    assert out.returncode == 0 and out.stdout.startswith("moco ")
    helped = _run("benchmarks.entry_point", "--help")
    assert helped.returncode == 0
    listed = " ".join(helped.stdout.split())
    assert "Commands: shard, pretrain, demo, probe, knn, export, tune, submit, bench." in listed
    product = _run("pipelines.cli", "--help")
    assert "Commands: shard, pretrain, demo, probe, knn, export, tune, submit." in " ".join(product.stdout.split())
    assert "bench" not in product.stdout


def _subcommands(parser) -> list[str]:
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return list(action.choices)


@pytest.mark.parametrize("registrars", [cli.PRODUCT_COMMANDS, None], ids=["product", "installed"])
def test_the_description_names_exactly_the_registered_commands(registrars):
    from benchmarks.entry_point import COMMANDS

    parser = cli.build_parser(COMMANDS if registrars is None else registrars)
    listed = parser.description.split("Commands: ", 1)[1].rstrip(".").split(", ")
    assert listed == _subcommands(parser)  # e.g. no 'evaluate' until it exists


def test_the_console_script_is_the_composition_with_bench():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"moco": "benchmarks.entry_point:main"}
    helped = _run("benchmarks.entry_point", "bench", "step", "--help")
    assert helped.returncode == 0 and "--queue-sizes" in helped.stdout


def test_bench_step_prints_json_with_a_ratio_on_the_last_line(capsys):
    argv = [
        "bench",
        "step",
        "--arch",
        "resnet18",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--queue-sizes",
        "16",
        "--batchnorm",
        "none",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--no-fp32",
        "--ema-archs",
        "resnet18",
        "--json",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    # The options reach the benchmark, and the ratio is the one its figures give (timings themselves
    # are not checked here: they belong in benchmarks).
    assert result["benchmark"] == "step"
    assert {key: result["config"][key] for key in ("arch", "image_size", "batch_size", "batchnorm", "steps")} == {
        "arch": "resnet18",
        "image_size": 32,
        "batch_size": 8,
        "batchnorm": "none",
        "steps": 1,
    }
    assert list(result["moco_img_per_s_by_queue_size"]) == ["16"] and "fp32" not in result
    moco, supervised = result["moco_img_per_s"], result["supervised_img_per_s"]  # each rounded to 0.1
    assert (moco - 0.05) / (supervised + 0.05) - 5e-4 <= result["ratio"] <= (moco + 0.05) / (supervised - 0.05) + 5e-4
    assert list(result["ema_update"]) == ["resnet18"]
    assert "bench step" in captured.err  # progress goes to stderr


def test_errors_are_one_line_without_traceback(capsys):
    assert main(["bench", "step", "--arch", "vgg16"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [error[0]] and "unknown arch 'vgg16'" in error[0] and "Traceback" not in error[0]
    assert main(["pretrain", "--data", "x"]) == 1
    assert "needs --recipe and --data" in capsys.readouterr().err


def test_arrow_allocator_keeps_freed_pages_unless_the_user_says_otherwise():
    script = "import os, pipelines; print(os.environ['MIMALLOC_PURGE_DELAY'])"
    environment = {key: value for key, value in os.environ.items() if key != "MIMALLOC_PURGE_DELAY"}
    kept = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=True)
    assert kept.stdout.strip() == "-1"
    chosen = subprocess.run(
        [sys.executable, "-c", script],
        env={**environment, "MIMALLOC_PURGE_DELAY": "250"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert chosen.stdout.strip() == "250"


def test_bench_train_reports_the_median_of_its_rounds():
    from benchmarks.common import median_of

    rounds = [{"img_per_s": 90.0, "steps": 70}, {"img_per_s": 130.0, "steps": 70}, {"img_per_s": 100.0, "steps": 70}]
    assert median_of(rounds, "img_per_s") == 100.0  # not the first round, not the mean (106.7)
    assert median_of(rounds, "steps") == 70


def test_bench_train_compares_the_job_per_trainer_cpu_count_on_the_medians(monkeypatch, tmp_path):
    import benchmarks.bench_train as bench_train

    speeds = {"single_process": [95.0, 20.0, 96.0], "step_alone": [100.0] * 3, "bare_loop": [90.0, 180.0, 45.0]}
    speeds |= {"bare_loop_reuse": [80.0, 80.0, 80.0], "job": [88.0, 89.0, 10.0]}
    calls: list[tuple[str, str]] = []

    def measure(target, label, path, overrides, **_):
        calls.append((path, overrides[-1]))
        threads = 2 if overrides[-1] == "scaling.cpus_per_worker=1.5" else 1
        assert "training.precision=bf16" in overrides  # the one resolved, for every path
        return {"img_per_s": speeds[path][sum(1 for call in calls if call == calls[-1]) - 1], "torch_threads": threads}

    def measure_or_resolve(target, label, **kwargs):
        if target.endswith(":resolve_precision"):
            return {"precision": "bf16"}
        return measure(target, label, **kwargs)

    monkeypatch.setattr(bench_train, "small_corpus_with_shards", lambda work: ({"path": "corpus"}, "shards"))
    monkeypatch.setattr(bench_train, "measure_in_fresh_process", measure_or_resolve)
    case = bench_train._case(32, 128, 5, 2, tmp_path, 100, (1.0, 1.5), 3)
    assert case["precision"] == "bf16"
    assert len(calls) == 3 * (1 + 2 * 4)  # the single process once per round, four paths per CPU count
    assert case["single_process"]["img_per_s"] == 95.0 and case["single_process"]["runs"] == [95.0, 20.0, 96.0]
    assert set(case["trainer_cpus"]) == {"1", "1.5"}
    for cpus, threads in (("1", 1), ("1.5", 2)):
        figures = case["trainer_cpus"][cpus]
        assert figures["torch_threads"] == threads and figures["job"]["img_per_s"] == 88.0
        expected = {"step_alone": 0.88, "bare_loop": 0.978, "bare_loop_reuse": 1.1, "single_process": 0.926}
        assert figures["ratios"] == expected
        # per round: job 88, 89, 10 over bare loop 90, 180, 45 -> 0.978, 0.494, 0.222
        assert figures["paired_ratios"] == expected | {"bare_loop": 0.494}


def test_a_bench_measurement_runs_in_a_new_process_and_a_failure_names_it():
    from benchmarks.common import measure_in_fresh_process

    assert measure_in_fresh_process("os:getpid", "bench test") != os.getpid()
    with pytest.raises(RuntimeError, match="bench test: the measurement failed"):
        measure_in_fresh_process("os:getpid", "bench test", unexpected=1)


@pytest.mark.parametrize("cpus", ["0", "-1", "two", "inf"])
def test_bench_train_refuses_a_trainer_cpu_count_that_is_not_positive(cpus, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "train", "--trainer-cpus", "1", cpus])
    assert stopped.value.code == 2  # argparse's usage error, before any corpus is built
    assert "--trainer-cpus: expected a positive number" in capsys.readouterr().err

"""The moco command line: version, help, JSON on the last line, one-line errors."""

import json
import os
import subprocess
import sys

from pipelines.cli import main


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("moco ")
    helped = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], capture_output=True, text=True)
    for command in ("shard", "pretrain", "demo", "bench"):
        assert command in helped.stdout


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
    assert result["ratio"] > 0 and result["moco_img_per_s"] > 0
    assert result["ema_update"]["resnet18"]["foreach_ms"] > 0
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

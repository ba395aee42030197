"""The benchmarks behind docs/results.md and docs/speed.md run end to end on tiny settings and print the figures
those pages quote; their command lines answer --help without torch and refuse bad flags in one line, as the tools
do. (The figures of such tiny runs mean nothing; what is checked is that every stage runs and reports.)"""
import re
import subprocess
import sys

import pytest
import torch

from vit_train.bench import model_step, muon_step, pipeline_overhead, time_to_accuracy
from vit_train.runtime import describe_device, fast_bf16

BENCHES = {"model_step": model_step, "muon_step": muon_step, "pipeline_overhead": pipeline_overhead,
           "time_to_accuracy": time_to_accuracy}
NUMBER = r"[\d,]+\.?\d*"


def test_the_benchmarks_parse_without_torch():
    probe = ("import sys\n"
             "from vit_train.bench import model_step, muon_step, pipeline_overhead, time_to_accuracy\n"
             "for build in (model_step.model_step_parser, muon_step.muon_step_parser, "
             "pipeline_overhead.pipeline_overhead_parser, time_to_accuracy.time_to_accuracy_parser):\n"
             "    assert build().format_help().startswith('usage: python -m vit_train.bench.')\n"
             "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr


@pytest.mark.parametrize("bench, argv, fragment", [
    ("model_step", ["--bogus"], "unrecognized arguments: --bogus"),
    ("model_step", ["--repeats", "0"], "--repeats: takes a whole number of at least 1"),
    ("model_step", ["--override", "num_layers=2"], "--override goes with --model"),
    ("model_step", ["--model", "ViT-Q_3"], "unknown model"),
    ("muon_step", ["--repeats", "0"], "--repeats: takes a whole number of at least 1"),
    ("muon_step", ["--config", "cifar10_nope"], "cifar10_nope"),
    ("pipeline_overhead", ["--steps", "many"], "--steps: takes a whole number"),
    ("pipeline_overhead", ["--data-dir", ""], "--data-dir is an empty path"),
    ("time_to_accuracy", ["--peer-set", "depth"], "--peer-set: takes KEY=VALUE"),
    ("time_to_accuracy", ["--peer-set", "width=3"], "the peer has no such setting"),
    ("time_to_accuracy", ["--time-budget", "bogus"], "--time-budget takes a duration"),
])
def test_bad_flags_are_one_line_and_exit_2(bench, argv, fragment):
    result = subprocess.run([sys.executable, "-m", f"vit_train.bench.{bench}", *argv], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and fragment in result.stderr, \
        result.stderr


def test_model_step_times_ours_timms_and_hfs_step(capsys):
    assert model_step.main(["--model", "testing", "--override", "num_layers=1", "--batch-size", "4", "--repeats",
                            "1", "--steps", "1", "--warmup", "1", "--device", "cpu", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert f"device {describe_device(torch.device('cpu'))}, torch " in out, out  # every figure names its processor
    for impl in ("ours", "timm", "hf"):
        assert re.search(rf"^  {impl} +{NUMBER} img/s", out, re.MULTILINE), out
    assert re.search(rf"ours / best peer \((timm|hf)\): {NUMBER}x", out), out
    assert re.search(rf"= {NUMBER}% of the {NUMBER} GFLOP/s GEMM roofline", out), out
    assert "| case | batch | precision | ours img/s | timm img/s | HF img/s | ours / best peer |" in out


def test_muon_step_times_ours_in_both_precisions_torchs_muon_and_adamw_against_forward_backward(capsys):
    assert muon_step.main(["--set", "model.transformer.num_layers=1", "--batch-size", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert f"device {describe_device(torch.device('cpu'))}, torch " in out, out  # every figure names its processor
    # One layer of cifar10_cpu's model: q, k, v apart and the projection, and the MLP's two turned wide.
    assert "Muon's matrices: 4 of 128x128, 2 of 128x512" in out, out
    auto = "bf16" if fast_bf16(torch.device("cpu")) else "fp32"
    for label in ("forward + backward", f"ours, Muon in {auto} (auto) + fused AdamW",
                  "torch.optim.Muon (bf16) + fused AdamW", "fused AdamW alone, every parameter",
                  "Newton-Schulz, fp32, batched by shape", "Newton-Schulz, bf16, one matrix at a time"):
        assert re.search(rf"^  {re.escape(label)} +{NUMBER} ms +{NUMBER}x forward \+ backward$", out, re.MULTILINE), out


def test_pipeline_overhead_compares_a_real_run_with_its_bare_step(capsys):
    assert pipeline_overhead.main(["--dataset", "synthetic", "--model", "testing", "--batch-size", "16",
                                   "--steps", "3", "--rounds", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"device {describe_device(torch.device('cpu'))}\n" in out, out
    assert re.search(rf"^round 0: end to end {NUMBER} img/s, bare step {NUMBER} img/s$", out, re.MULTILINE), out
    assert re.search(rf"^median: end to end {NUMBER} img/s, bare step {NUMBER} img/s, pipeline overhead "
                     rf"-?{NUMBER}%$", out, re.MULTILINE), out


def test_time_to_accuracy_runs_ours_and_the_peer_in_one_budget(tmp_path, fake_cifar, capfd):
    fake_cifar(tmp_path)  # CIFAR-10's own file layout, which torchvision's CIFAR10 reads for the peer
    assert time_to_accuracy.main([
        "--time-budget", "12s", "--data-dir", str(tmp_path),
        "--set", "model_name=testing", "--set", "batch_size=32", "--set", "optim.name=adamw",
        "--peer-set", "embed_dim=32", "--peer-set", "depth=1", "--peer-set", "num_heads=2",
        "--peer-set", "batch_size=32", "--peer-set", "workers=0"]) == 0
    out = capfd.readouterr().out
    assert "| run (12s) | processor | steps | test accuracy | wall time | train images/s |" in out, out
    processor = re.escape(describe_device(torch.device("cpu")))
    for run in (r"vit-train --config cifar10_cpu", r"timm ViT \+ torchvision CIFAR10 \+ DataLoader"):
        assert re.search(rf"^\| {run}.* \| {processor} \| \d+ \| {NUMBER}% \| {NUMBER} min \| \d+ \|$", out,
                         re.MULTILINE), out


def test_a_failed_run_in_the_comparison_is_one_line_after_its_own(tmp_path, capfd):
    """Our run explains itself (no CIFAR here) and the benchmark adds one line, without a traceback."""
    assert time_to_accuracy.main(["--time-budget", "30s", "--data-dir", str(tmp_path)]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.endswith("error: our run (vit-train) stopped with exit status 2; what it "
                                                   "said is above\n"), err

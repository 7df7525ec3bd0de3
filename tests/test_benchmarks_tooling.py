"""The benchmark tooling: report.py's ratios, the contender-equivalence check, the memory and FLOP
measurements of benchmarks/common.py, machine.py, and gpu_check.sh's dry run on CPU."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name: str):
    """Import benchmarks/<name>.py under a private name (benchmarks/ is not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # report.py / common.py import their siblings
    spec = importlib.util.spec_from_file_location(f"_fastgan_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


report = _load("report")
common = _load("common")
machine = _load("machine")


# ---------------------------------------------------------------------------------------------
# report.py
# ---------------------------------------------------------------------------------------------

def _bench(group, contender, median, *, iqr=0.001, rounds=10, steps=1, **extra):
    return {"group": group, "name": f"bench[{group}-{contender}]", "params": {"contender": contender},
            "extra_info": {"contender": contender, "steps_per_round": steps, **extra},
            "stats": {"median": median, "iqr": iqr, "rounds": rounds, "min": median, "max": median}}


def _synthetic(tmp_path, benches, name="bench.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benches}))
    return path


def test_report_ratios_are_exact(tmp_path):
    path = _synthetic(tmp_path, [
        _bench("step A", "naive", 0.030, peak_memory_bytes=3 * 2 ** 20, limit_s=0.002),
        _bench("step A", "tuned", 0.015, limit_s=0.002),
        _bench("step A", "compile", 0.012, compile_time_s=4.5, limit_s=0.002),
        _bench("step A", "fastgan", 0.010, peak_memory_bytes=2 ** 20, limit_s=0.002),
        # 10 steps per timed call: per-step time is median / 10
        _bench("step B", "naive", 0.50, steps=10),
        _bench("step B", "fastgan", 0.04, steps=10),
    ])
    groups = report.load_groups([path])
    assert [g.name for g in groups] == ["step A", "step B"]
    ratios = report.speedups(groups)
    assert ratios["step A"] == pytest.approx({"naive": 3.0, "tuned": 1.5, "compile": 1.2}, rel=1e-12)
    assert ratios["step B"] == pytest.approx({"naive": 12.5}, rel=1e-12)
    assert groups[1].entry("fastgan").median_s == pytest.approx(0.004, rel=1e-12)

    out = tmp_path / "out"
    assert report.main([str(path), "--out-dir", str(out), "--title", "T"]) == 0
    text = (out / "report.md").read_text()
    assert "| step A | 10.000 ms | 3.00× | 1.50× | 1.20× | 20.0% |" in text
    assert "| step B | 4.000 ms | 12.50× | – | – | – |" in text
    assert "| naive | – | 30.000 ms | 1.000 ms | 10 | 3.0 | – | 3.00× | 6.7% |" in text
    assert "| compile | – | 12.000 ms | 1.000 ms | 10 | – | 4.500 s | 1.20× | 16.7% |" in text
    assert "| limit (FLOPs / matmul rate) | 2.000 ms |" in text
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_report_names_each_groups_limit_basis(tmp_path):
    """An optimizer step's limit is bytes over bandwidth, and its row says so; steps keep FLOPs."""
    basis = "bytes moved / copy bandwidth"
    path = _synthetic(tmp_path, [
        _bench("adam-step-5M", "torch-fused", 0.002, limit_s=0.001, limit_basis=basis),
        _bench("adam-step-5M", "fastgan", 0.0025, limit_s=0.001, limit_basis=basis),
        _bench("step A", "naive", 0.030, limit_s=0.002),
        _bench("step A", "fastgan", 0.010, limit_s=0.002),
    ])
    out = tmp_path / "out"
    assert report.main([str(path), "--out-dir", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert f"| limit ({basis}) | 1.000 ms |" in text
    assert "| limit (FLOPs / matmul rate) | 2.000 ms |" in text
    assert "| adam-step-5M | 2.500 ms | 0.80× | – | 40.0% |" in text


def test_copy_bandwidth_is_measured_not_assumed():
    """Bytes read + written per second of real copies: positive, finite, and the same order of
    magnitude across two measurements (a broken timer would give 0, inf or wildly varying numbers)."""
    first = common.measure_copy_bandwidth("cpu", nbytes=2 ** 24, repeats=3)
    second = common.measure_copy_bandwidth("cpu", nbytes=2 ** 24, repeats=3)
    assert 1e8 < first < 1e13 and 1e8 < second < 1e13
    assert 0.2 < first / second < 5


def test_report_prefers_cuda_event_times_and_names_contenders(tmp_path):
    bench = _bench("g", "fastgan", 1.0, steps=10, event_median_s=0.05)
    other = _bench("g", "eager", 2.0, steps=10, event_median_s=0.2)
    no_extra = {"group": "h", "name": "bench_x[64-ref]", "params": {"n": 64, "impl": "ref"},
                "extra_info": {}, "stats": {"median": 1e-5, "iqr": 0, "rounds": 3}}
    groups = report.load_groups([_synthetic(tmp_path, [bench, other, no_extra])])
    assert groups[0].entry("fastgan").median_s == 0.05 and groups[0].entry("fastgan").timer == "cuda events"
    assert report.speedups(groups)["g"] == {"eager": pytest.approx(4.0, rel=1e-12)}
    assert groups[1].entries[0].contender == "64-ref"
    assert "h" not in report.speedups(groups)  # no fastgan in that group: times only, no ratio
    assert "### h" in report.markdown(groups)


def test_report_prefers_paired_times_when_the_whole_group_has_them(tmp_path):
    path = _synthetic(tmp_path, [
        _bench("p", "naive", 0.9, paired_median_s=0.030),
        _bench("p", "fastgan", 0.1, paired_median_s=0.012),
        _bench("q", "naive", 0.9, paired_median_s=0.030),
        _bench("q", "fastgan", 0.1)])  # one contender without: the group falls back to its own medians
    groups = report.load_groups([path])
    assert report.speedups(groups) == {"p": {"naive": pytest.approx(2.5, rel=1e-12)},
                                       "q": {"naive": pytest.approx(9.0, rel=1e-12)}}
    text = report.markdown(groups)
    assert "| p (paired) | 12.000 ms | 2.50× |" in text and "| q | 100.000 ms | 9.00× |" in text
    assert "| naive | 30.000 ms | 900.000 ms | 1.000 ms | 10 | – | – | 2.50× | – |" in text


def test_report_finds_ours_by_prefix_when_unique(tmp_path):
    groups = report.load_groups([_synthetic(tmp_path, [
        _bench("ema", "fastgan+ema", 0.002), _bench("ema", "torch-fused+lerp", 0.005),
        _bench("two", "fastgan-a", 1.0), _bench("two", "fastgan-b", 2.0), _bench("two", "torch", 3.0)])])
    assert report.speedups(groups) == {"ema": {"torch-fused+lerp": pytest.approx(2.5, rel=1e-12)}}


def test_report_rejects_duplicate_contenders_and_empty_input(tmp_path):
    dup = _synthetic(tmp_path, [_bench("g", "naive", 1.0), _bench("g", "naive", 2.0)])
    with pytest.raises(ValueError, match="contender 'naive' twice"):
        report.load_groups([dup])
    empty = _synthetic(tmp_path, [], name="empty.json")
    assert report.main([str(empty), "--out-dir", str(tmp_path / "o")]) == 1


# ---------------------------------------------------------------------------------------------
# common.py: equivalence check, memory, FLOPs
# ---------------------------------------------------------------------------------------------

SMALL = common.Problem("toy-small", 32, (2,), (2,), lambda: common.toy2d_gan(hidden=16))


class _WrongGLearningRate(common.TunedEager):
    """Deliberately wrong: G's learning rate doubled (invisible in the first step's losses)."""

    def __init__(self, *args):
        super().__init__(*args)
        for group in self.opt_g.param_groups:
            group["lr"] = 2 * common.LR


class _WrongNoDUpdate(common.TunedEager):
    """Deliberately wrong: skips D's optimizer step (and is therefore faster)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.opt_d.step = lambda *a, **k: None


def _prepare(contender_cls, initial, inputs, steps=3):
    def build():
        g, d = copy.deepcopy(initial[0]), copy.deepcopy(initial[1])
        if contender_cls is common.NaiveEager:
            return contender_cls(g, d, "cpu")
        return contender_cls(g, d, "cpu", SMALL.batch)
    return common.prepare(build, inputs, steps=steps, initial=initial)


def test_equivalence_check_accepts_equal_and_catches_wrong_contenders():
    initial = SMALL.models(seed=0)
    inputs = common.InputSets(SMALL, "cpu", count=3)
    runs = {"naive": _prepare(common.NaiveEager, initial, inputs),
            "tuned": _prepare(common.TunedEager, initial, inputs)}
    losses = {n: r.losses for n, r in runs.items()}
    updates = {n: r.updates for n, r in runs.items()}
    common.check_equivalent(losses, updates=updates)  # the two eager loops compute the same step
    assert float(updates["naive"][0].abs().max()) > 0 and float(updates["naive"][1].abs().max()) > 0

    # G's learning rate doubled: the losses move by ~lr per step, within the losses' tolerance...
    wrong = _prepare(_WrongGLearningRate, initial, inputs)
    assert wrong.losses[0] == pytest.approx(losses["naive"][0], rel=1e-6)
    common.check_equivalent(dict(losses, wrong=wrong.losses))
    # ...while G's parameter update differs by its whole size
    with pytest.raises(common.ContenderMismatch, match=r"'wrong': its update of G's parameters differs .* by 1\.0"):
        common.check_equivalent(losses, updates=dict(updates, wrong=wrong.updates))

    # D never updated: g_loss (computed by the updated D) differs, and so do the updates
    skipped = _prepare(_WrongNoDUpdate, initial, inputs)
    with pytest.raises(common.ContenderMismatch, match=r"'wrong' step \d: g_loss"):
        common.check_equivalent(dict(losses, wrong=skipped.losses))
    with pytest.raises(common.ContenderMismatch, match=r"'wrong': its update of [GD]'s parameters"):
        common.check_equivalent(losses, updates=dict(updates, wrong=skipped.updates))

    nan = dict(losses, bad=[(float("nan"), 0.0)] * 3)
    with pytest.raises(common.ContenderMismatch, match="'bad' step 0: d_loss = nan"):
        common.check_equivalent(nan)


def test_prepare_measures_memory_and_records_first_losses():
    initial = SMALL.models(seed=0)
    inputs = common.InputSets(SMALL, "cpu", count=3)
    prepared = common.prepare(lambda: common.make_contender("naive", SMALL, "cpu", initial), inputs, steps=3)
    g, d = copy.deepcopy(initial[0]), copy.deepcopy(initial[1])
    eager = common.NaiveEager(g, d, "cpu")
    assert prepared.losses == [tuple(float(x) for x in eager.step(*inputs[i])) for i in range(3)]
    param_bytes = sum(p.numel() * p.element_size() for m in initial for p in m.parameters())
    # the copies of the parameters, their gradients and Adam's two moments are all allocated inside
    assert prepared.peak_memory_bytes >= 4 * param_bytes
    assert prepared.peak_memory_bytes < 100 * param_bytes + 2 ** 20
    assert "profiler" in prepared.memory_method and prepared.first_steps_s > 0


def test_step_flops_counts_every_matmul_of_the_tuned_step():
    dims_g, dims_d, batch = [3, 5, 7], [7, 4, 1], 6
    problem = common.Problem("flops", batch, (3,), (7,), lambda: (
        nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 7)),
        nn.Sequential(nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 1), nn.Sigmoid())))
    mm = lambda dims, b: [2 * b * i * o for i, o in zip(dims, dims[1:])]  # noqa: E731
    g, d = mm(dims_g, batch), mm(dims_d, batch)
    expected = (sum(g)                         # G forward (shared by both updates)
                + 2 * sum(d)                   # D forward on real and on fake
                + 2 * (sum(d) + sum(d[1:]))    # D backward: weight grads, input grads past layer 1
                + sum(d)                       # G step: D forward on fake
                + sum(d)                       # G step: D backward, input grads only (D frozen)
                + sum(g) + sum(g[1:]))         # G backward: weight grads, input grads past layer 1
    assert common.step_flops(problem, "cpu", problem.models()) == expected


def test_problems_share_models_and_inputs_rotate():
    probs = {p.name: p for p in common.problems("cpu")}
    assert {"mlp-b64", "mlp-b512", "toy2d-b256"} <= set(probs) and any(n.startswith("dcgan") for n in probs)
    g, d = probs["mlp-b64"].models(seed=3)
    g2, _ = probs["mlp-b64"].models(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(g.parameters(), g2.parameters()))
    assert [m.out_features for m in g if isinstance(m, nn.Linear)] == [256, 512, 784]
    inputs = common.InputSets(probs["mlp-b64"], "cpu", count=3)
    first = inputs.next()
    assert first[0].shape == (64, 784) and first[1].shape == (64, 64)
    assert not torch.equal(first[0], inputs.next()[0])
    inputs.next()
    assert inputs.next()[0] is first[0]


def test_interleaved_times_rotate_the_order_and_time_only_the_timed_calls(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    calls_made = []
    cost = {"a": 1.0, "b": 2.0, "c": 4.0}

    def call(n):
        calls_made.append(n)
        clock[0] += cost[n]
    calls = {n: (lambda n=n: call(n)) for n in cost}
    times = common.interleaved_times(calls, rounds=3, iterations=2, warm=1)
    # each turn: one untimed call, then two timed; rounds start at a, then b, then c
    assert "".join(calls_made) == "aaabbbccc" + "bbbcccaaa" + "cccaaabbb"
    assert times == {n: [c] * 3 for n, c in cost.items()}  # per call: the warm call and the turn's count out
    assert common.speedup_quartiles({"x": [2.0, 4.0, 6.0], "fastgan": [1.0, 1.0, 1.0]}) == {"x": [2.0, 4.0, 6.0]}


def test_paired_op_group_builds_once_times_all_and_frees_after_the_last_contender():
    built = []

    def build(name):
        built.append(name)
        return (lambda: sum(range(2000 if name == "eager" else 1000))), 2, {"note": name}

    group = common.paired_op_group("g (test)", ["eager", "fastgan"], build, enabled=False)
    assert common.paired_op_group("g (test)", ["eager", "fastgan"], build, enabled=False) is group
    assert built == ["eager", "fastgan"] and group.iterations == 2 and group.rounds == 1
    extra = common.take_paired_op("g (test)", "eager").extra_info("eager")
    assert extra["paired_median_s"] > 0 and extra["note"] == "eager" and "fastgan_paired_speedup_quartiles" not in extra
    extra = common.take_paired_op("g (test)", "fastgan").extra_info("fastgan")
    assert set(extra["fastgan_paired_speedup_quartiles"]) == {"eager"}
    assert "g (test)" not in common._PAIRED_OP_GROUPS  # freed after the last contender took it
    with pytest.raises(ValueError, match="same number of iterations"):
        common.paired_op_group("h (test)", ["a", "b"], lambda n: (lambda: None, 1 if n == "a" else 2, {}),
                               enabled=False)
    # torch.compile contenders are built first (a CUDA graph captured before a compile faulted on replay)
    built.clear()
    group = common.paired_op_group("k (test)", ["eager", "torch_compile", "fastgan"], build, enabled=False)
    assert built == ["torch_compile", "eager", "fastgan"] and list(group.calls) == built
    for name in ("eager", "torch_compile", "fastgan"):
        common.take_paired_op("k (test)", name)


def test_paired_op_group_rounds_budget_failed_builds_and_eviction(monkeypatch):
    monkeypatch.setattr(common, "_PAIRED_OP_GROUPS", {})
    monkeypatch.setattr(common, "PAIRED_OP_BUDGET_S", 0.0)

    def build(name):
        if name == "broken":
            raise RuntimeError("cannot build broken")
        return (lambda: None), 1, {}

    group = common.paired_op_group("a (test)", ["eager", "broken", "fastgan"], build, enabled=True)
    assert group.rounds == 7 and set(group.medians) == {"eager", "fastgan"}  # the fewest rounds; broken left out
    with pytest.raises(RuntimeError, match="cannot build broken"):
        common.take_paired_op("a (test)", "broken")
    assert common.take_paired_op("a (test)", "fastgan").extra_info("fastgan")["paired_rounds"] == 7
    monkeypatch.setattr(common, "PAIRED_OP_BUDGET_S", 1e9)
    assert common.paired_op_group("b (test)", ["eager"], build, enabled=True).rounds == 101  # the most
    # At most two groups stay alive: a third evicts the oldest (one that -k left partly taken).
    common.paired_op_group("c (test)", ["eager"], build, enabled=False)
    assert list(common._PAIRED_OP_GROUPS) == ["b (test)", "c (test)"]


def test_machine_description():
    info = machine.describe()
    for key in ("cpu_model", "cpu_count", "torch", "triton", "device", "date_utc"):
        assert key in info
    json.dumps(info)
    assert "cores" in machine.short_name(info) or info["device"] == "cuda"


def test_machine_commit_says_when_the_tree_is_dirty(tmp_path):
    """A run of an uncommitted tree is recorded as HEAD+dirty, not as HEAD."""
    import shutil
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(BENCH / "machine.py", repo / "benchmarks" / "machine.py")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(git[:5] + ["init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    spec = importlib.util.spec_from_file_location("_fastgan_machine_copy", repo / "benchmarks" / "machine.py")
    copy_ = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy_)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert copy_._git_commit() == head
    (repo / "benchmarks" / "machine.py").write_text((repo / "benchmarks" / "machine.py").read_text() + "\n# edit\n")
    assert copy_._git_commit() == head + "+dirty"


# ---------------------------------------------------------------------------------------------
# gpu_check.sh
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU mode; a CUDA machine runs it for real")
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu check"   # a space in the path must not break the script
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "bench_step: ok" in summary and "report: ok" in summary and "all phases ok" in summary
    assert json.loads((out / "machine.json").read_text())["device"] == "cpu"
    results = json.loads((out / "bench_step.json").read_text())["benchmarks"]
    assert {b["extra_info"]["contender"] for b in results} == set(common.CONTENDERS)
    assert "| step toy2d-b256 (cpu) (paired) |" in (out / "report.md").read_text()
    assert (out / "report.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU mode; a CUDA machine runs it for real")
def test_gpu_check_keeps_for_the_suites_only_what_they_need(tmp_path):
    """A small budget with one suite still gives tests/gpu its asked limit: the time kept for the suites
    follows the suites chosen (a flat 200 s left a 300 s call with two suites 17 s of tests on an H100)."""
    out = tmp_path / "o"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTGAN_GPU_CHECK_SUITES="bench_losses", FASTGAN_GPU_CHECK_BUDGET="200",
               FASTGAN_GPU_CHECK_TESTS_LIMIT="100")
    subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run", str(out)], cwd=tmp_path, env=env,
                   capture_output=True, text=True, timeout=600)
    summary = (out / "summary.txt").read_text()
    assert "tests/gpu: ok" in summary and "gets" not in summary, summary
    assert "bench_losses (collect only): ok" in summary


def test_gpu_check_refuses_without_cuda_unless_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3 and "--dry-run" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# profile_kernels.py
# ---------------------------------------------------------------------------------------------------

def test_profile_kernels_tables_each_variant(capsys):
    """One table per variant and the per-step summary (self CPU time here; device time on CUDA)."""
    profile = _load("profile_kernels")
    assert profile.main(["toy2d-b256", "--variants", "fused", "unfused", "--steps", "1", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    for variant in ("fused", "unfused"):
        assert f"== toy2d-b256 {variant}: " in out
        line = next(ln for ln in out.splitlines() if ln.startswith(f"{variant}: "))
        assert float(line.split()[1]) > 0
    with pytest.raises(SystemExit):
        profile.main(["no-such-problem"])


# ---------------------------------------------------------------------------------------------------
# kernel_resources.py
# ---------------------------------------------------------------------------------------------------

def _kernel_resources(*args, interpret: bool):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_DEBUG", "FASTGAN_BN_SINGLE_PASS_MAX_ELEMENTS")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(BENCH / "kernel_resources.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_no_triton_launch_spills_registers_on_sm90(tmp_path):
    """Every kernel launch of every op, compiled offline for an H100 by Triton's own ptxas with the JIT's
    specialisation: every variant (activations, loss kinds, dtypes, modes, at small sizes) compiles, no
    launch at the benchmarks' sizes spills registers to the stack (a spilling kernel is several times
    slower on the GPU, and nothing else run on a CPU shows it), and every kernel is launched by some
    workload. The check must fail where a launch at those sizes spills: the float64 loss's program at
    the launch it had before f33597f (4096 wide, 4 warps: 1.9 KB of stack) stands in for one."""
    result = _kernel_resources(interpret=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "): 0 at those sizes with spills," in result.stdout and ", 0 that do not compile" in result.stdout
    assert "no workload launched" not in result.stdout
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("_")}
    assert {"_d_loss_kernel", "_g_loss_kernel", "_bias_act_kernel", "_bias_act_grad_kernel", "_stats_kernel",
            "_single_pass_backward_kernel"} <= listed
    assert "(bench_step dcgan-w64-b128)" in result.stdout and "(bench_layers linear B=512 F=1024)" in result.stdout

    recorded = _kernel_resources("--record-only", "--ops", "d_loss", interpret=True)
    assert recorded.returncode == 0, recorded.stderr[-4000:]
    launches = json.loads(recorded.stdout)
    wide = [l for l in launches if l["kernel"] == "_d_loss_kernel" and l["args"]["BLOCK"] == 4096]
    as_sized = [l for l in wide if l["sizes"]]
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(as_sized))
    clean = _kernel_resources("--launches", str(path), interpret=False)
    assert as_sized and clean.returncode == 0, clean.stdout[-4000:]
    float64 = [dict(l, sizes=True, args=dict(l["args"], BLOCK=4096), options=dict(l.get("options", {}), num_warps=4))
               for l in launches if l["kernel"] == "_d_loss_kernel" and l["args"]["ACC"] == {"tl_dtype": "fp64"}
               and l["args"]["BLOCK"] == 2048]
    path.write_text(json.dumps(float64))
    spilled = _kernel_resources("--launches", str(path), interpret=False)
    assert float64 and spilled.returncode == 1 and "<-- spills" in spilled.stdout, spilled.stdout[-4000:]
    # and a launch the compiler rejects (tl.arange needs a power-of-two length) is a failure too
    path.write_text(json.dumps([dict(as_sized[0], args=dict(as_sized[0]["args"], BLOCK=3), sizes=False)]))
    broken = _kernel_resources("--launches", str(path), interpret=False)
    assert broken.returncode == 1 and "DOES NOT COMPILE" in broken.stdout, broken.stdout[-4000:] + broken.stderr

"""Wall time and peak memory of each stage of the fusion engine on BERT-base- and ViT-B-shaped pairs.

For every family (a BertForSequenceClassification pair and a ViTForImageClassification pair, random init with
two seeds) and every configuration (weight- or activation-based cost, exact or Sinkhorn solver), one fusion
runs in a fresh child process (this script with the hidden `--one` flag), so that one configuration's memory
peak cannot leak into the next. The child reports, at the end of each stage (plan, statistics, maps,
apply+average), the stage's wall time, the process peak RSS so far (`ru_maxrss`) and the current RSS, plus where
the time of the two heavy stages goes: the forward passes versus the float64 statistics accumulation, and the
OT solves grouped by problem size versus building the costs. A configuration that runs past `--timeout` is
stopped; its row then shows the stage it was stuck in and the solves done so far.

    python benchmarks/bench_engine.py                      # both families, 4 configurations, 200 samples
    python benchmarks/bench_engine.py --small              # tiny models: a smoke run of a few seconds
    python benchmarks/bench_engine.py --family bert --costs weights --solvers exact --json out.json
    python benchmarks/bench_engine.py --family bert --costs activations --nproc 1 2   # statistics speed-up
    python benchmarks/bench_engine.py --from-disk /tmp/ckpt                # fuse saved checkpoints (streamed)
    python benchmarks/bench_engine.py --device cuda                        # passes and Sinkhorn on the GPU

`--nproc N` runs the child under `torchrun --nproc_per_node N` (gloo on CPU; each process gets one thread
unless --threads says otherwise) and reports the statistics-stage time of the main process, which includes
waiting for the slowest shard and the reduction. `--from-disk DIR` saves the pair once (in a process of its
own) and passes the checkpoint paths, so `fuse` loads them one at a time and averages into the loaded
anchor; without it the models are built in the child and passed as objects (the fused model is a copy).

Targets (from the issue; a 2-core machine): whole weight-based fusion < 60 s, activation-based < 180 s,
peak RSS < 4 GB.

Instrumentation only wraps functions from the outside, in the child process, and only those that exist
(fusion.collect_statistics, fusion.compute_maps, fusion.align_parameters, fusion.average_into,
maps.solve_transport, maps.solve_transport_batch, UnitStatistics.update); the package runs exactly as
`fuse_with_diagnostics` runs it. Each run records a hash of the package sources it imported, since the
package may change between runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from importlib import metadata

# The orchestrating process imports neither torch nor the package: it stays small, so the children (started
# with a fresh interpreter) measure only their own memory.

FAMILIES = ("bert", "vit")
COSTS = ("weights", "activations")
SOLVERS = ("exact", "sinkhorn")
STAGES = ("plan", "statistics", "maps", "apply+average")
TARGET_SECONDS = {"weights": 60.0, "activations": 180.0}
TARGET_RSS_GB = 4.0
GB = 1e9
EVENT = "@@bench "  # prefix of the child's machine-readable stdout lines
PROGRESS_EVERY_S = 15.0
STARTUP_ALLOWANCE_S = 300.0  # imports and model building, before the timeout starts counting
LARGE_SOLVE = 500_000  # cost entries from which a solve announces itself

FULL_SHAPE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
SMALL_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


# ----------------------------------------------------------------------------------------------------
# child: one fusion, instrumented
# ----------------------------------------------------------------------------------------------------


_EMIT_LOCK = threading.Lock()  # solver threads report concurrently; one event per line, never interleaved


def _emit(kind: str, **payload) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun, the main process speaks for the run
        return
    line = EVENT + json.dumps({"event": kind, "time": time.time(), **payload}) + "\n"
    with _EMIT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def _peak_rss() -> int:
    """Process peak RSS in bytes (`ru_maxrss` is in KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _source_hash(package_dir: str) -> str:
    """A short hash of the package's sources (.py and specs), to tell which engine version a run measured."""
    import hashlib

    digest = hashlib.sha256()
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".yaml")):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, package_dir).encode())
                with open(path, "rb") as handle:
                    digest.update(handle.read())
    return digest.hexdigest()[:12]


def _profile_report(profiler, spec: dict, top: int = 25) -> str:
    """Dumps the cProfile stats next to the others and returns the top functions by own and total time."""
    import io
    import pstats

    os.makedirs(spec["profile"], exist_ok=True)
    name = f"{spec['family']}-{spec['cost']}-{spec['solver']}{'-small' if spec['small'] else ''}.prof"
    path = os.path.join(spec["profile"], name)
    profiler.dump_stats(path)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    text.write(f"cProfile of the fusion call, saved to {path}\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def build_pair(family: str, small: bool, seeds=(0, 1)):
    """Two randomly initialised models of the family, differing only in their seed."""
    import torch
    import transformers as T

    shape = SMALL_SHAPE if small else FULL_SHAPE
    if family == "bert":
        config = T.BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=2, **shape)
        model_class = T.BertForSequenceClassification
    else:
        image = dict(image_size=32, patch_size=8) if small else dict(image_size=224, patch_size=16)
        config = T.ViTConfig(**image, num_channels=3, num_labels=10, **shape)
        model_class = T.ViTForImageClassification
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(model_class(config).eval())
    return models


def prepare_checkpoints(family: str, small: bool, directory: str) -> str:
    """Saves the pair once under `directory/<family>[-small]/{0,1}` (reused if there) and returns that folder.

    It runs in a process of its own, so that building the models never counts in a fusion's peak RSS.
    """
    folder = os.path.join(directory, family + ("-small" if small else ""))
    if all(os.path.exists(os.path.join(folder, str(seed), "model.safetensors")) for seed in (0, 1)):
        return folder
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bench_engine as b; "
        "[m.save_pretrained(f'{sys.argv[4]}/{i}') for i, m in enumerate(b.build_pair(sys.argv[2], sys.argv[3] == '1'))]"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", script, here, family, "1" if small else "0", folder], check=True)
    return folder


def _checkpoint_config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _parameter_count(model) -> int:
    """Parameters of a model, or of a checkpoint (read from its safetensors header, without loading it)."""
    if not isinstance(model, str):
        return sum(p.numel() for p in model.parameters())
    from safetensors import safe_open

    with safe_open(os.path.join(model, "model.safetensors"), "pt") as handle:
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())


class RandomBatches:
    """Alignment data generated on the fly (re-iterable, deterministic), so it adds no resident memory.

    BERT: random token ids, a [CLS] first, each row padded after a random length in [seq_len/2, seq_len].
    ViT: standard-normal pixel values.
    """

    def __init__(self, family: str, model_config, samples: int, batch_size: int, seq_len: int, seed: int = 1234):
        self.family, self.config = family, model_config
        self.samples, self.batch_size, self.seq_len, self.seed = samples, batch_size, seq_len, seed

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.samples, self.batch_size):
            size = min(self.batch_size, self.samples - start)
            if self.family == "bert":
                ids = torch.randint(1000, self.config.vocab_size, (size, self.seq_len), generator=generator)
                ids[:, 0] = 101
                lengths = torch.randint(self.seq_len // 2, self.seq_len + 1, (size,), generator=generator)
                mask = (torch.arange(self.seq_len)[None, :] < lengths[:, None]).long()
                yield {"input_ids": ids * mask, "attention_mask": mask}
            else:
                c, s = self.config.num_channels, self.config.image_size
                yield {"pixel_values": torch.randn(size, c, s, s, generator=generator)}


class Probe:
    """Per-stage wall time and memory, solver calls by size, statistics-update time; emits progress events."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stages: dict[str, dict] = {}
        self.current: str | None = "plan"
        self.stage_started = self.started
        self.solves: dict[str, list[float]] = {}  # "n_a x n_b" -> [count, seconds]
        self.update_calls = 0
        self.update_seconds = 0.0
        self.last_progress = self.started

    # stages ----------------------------------------
    def begin(self, stage: str) -> None:
        if self.current == "plan" and "plan" not in self.stages:
            self.end("plan")
        self.current = stage
        self.stage_started = time.perf_counter()
        _emit("begin", stage=stage, elapsed=self.stage_started - self.started)

    def end(self, stage: str) -> None:
        seconds = time.perf_counter() - self.stage_started
        entry = self.stages.setdefault(stage, {"seconds": 0.0, "calls": 0})
        entry["seconds"] += seconds
        entry["calls"] += 1
        entry["peak_rss"] = _peak_rss()
        entry["rss"] = _current_rss()
        self.current = None
        _emit("stage", stage=stage, **entry, elapsed=time.perf_counter() - self.started, solves=self.solves)

    def wrap_stage(self, stage: str, function):
        def wrapped(*args, **kwargs):
            self.begin(stage)
            try:
                return function(*args, **kwargs)
            finally:
                self.end(stage)

        return wrapped

    # fine-grained ----------------------------------
    def wrap_solver(self, function, batched: bool = False):
        def wrapped(cost, *args, **kwargs):
            started = time.perf_counter()
            key = ("batch " if batched else "") + "x".join(str(n) for n in cost.shape)
            if cost.size >= LARGE_SOLVE:  # so that a run stopped inside one long solve says which
                _emit("solve_begin", shape=key, elapsed=started - self.started)
            try:
                return function(cost, *args, **kwargs)
            finally:
                entry = self.solves.setdefault(key, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - started
                self._maybe_progress()

        return wrapped

    def wrap_update(self, function):
        def wrapped(stats, a, b):
            started = time.perf_counter()
            try:
                return function(stats, a, b)
            finally:
                self.update_calls += 1
                self.update_seconds += time.perf_counter() - started
                self._maybe_progress()

        return wrapped

    def _maybe_progress(self) -> None:
        now = time.perf_counter()
        if now - self.last_progress >= PROGRESS_EVERY_S:
            self.last_progress = now
            _emit(
                "progress",
                stage=self.current,
                elapsed=now - self.started,
                stage_elapsed=now - self.stage_started,
                solves=self.solves,
                update_calls=self.update_calls,
                update_seconds=self.update_seconds,
                peak_rss=_peak_rss(),
            )


def run_one(spec: dict) -> None:
    """The child: builds the pair, fuses it once with every stage instrumented, emits the measurements."""
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    import torch

    import hf_otfusion
    from hf_otfusion import FusionConfig, fuse_with_diagnostics
    from hf_otfusion import fusion as fusion_module
    from hf_otfusion.engine import solve as solve_module
    from hf_otfusion.engine import statistics as statistics_module

    _emit(
        "hello",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        package=hf_otfusion.__version__,
        source_hash=_source_hash(os.path.dirname(hf_otfusion.__file__)),
        processes=int(os.environ.get("WORLD_SIZE", "1")),
    )
    if spec.get("from_disk"):  # checkpoints saved by `prepare_checkpoints`: fuse loads them itself
        models = [os.path.join(spec["from_disk"], str(seed)) for seed in (0, 1)]
        model_config = _checkpoint_config(models[0])
    else:
        models = build_pair(spec["family"], spec["small"])
        model_config = models[0].config
    options = dict(cost=spec["cost"], solver=spec["solver"], reg=spec["reg"], num_samples=spec["samples"])
    if spec.get("tokens_per_sample"):  # else every non-padding token
        options["tokens_per_sample"] = spec["tokens_per_sample"]
    if spec["batch_size"]:  # else the package's default batch size
        options["batch_size"] = spec["batch_size"]
    config = FusionConfig(**options)
    data = None
    if spec["cost"] == "activations":  # batches of config.batch_size (an iterable of batches is used as given)
        data = RandomBatches(spec["family"], model_config, spec["samples"], config.batch_size, spec["seq_len"])
    parameters = _parameter_count(models[0])
    rss_before, peak_before = _current_rss(), _peak_rss()
    _emit(
        "loaded",
        parameters=parameters,
        rss_before=rss_before,
        peak_before=peak_before,
        batch_size=config.batch_size,
    )

    probe = Probe()
    stages = {
        "collect_statistics": "statistics",
        "compute_maps": "maps",
        "align_parameters": "apply+average",  # older engines: align every parent, then average
        "average_into": "apply+average",
        "_build_fused_model": "apply+average",  # engines before engine/average.py
    }
    wrapped = []
    for function, stage in stages.items():
        if hasattr(fusion_module, function):
            setattr(fusion_module, function, probe.wrap_stage(stage, getattr(fusion_module, function)))
            wrapped.append(f"fusion.{function}")
    for function, batched in (("solve_transport", False), ("solve_transport_batch", True)):
        if hasattr(solve_module, function):
            setattr(solve_module, function, probe.wrap_solver(getattr(solve_module, function), batched))
            wrapped.append(f"solve.{function}")
    if hasattr(statistics_module.UnitStatistics, "update"):
        statistics_module.UnitStatistics.update = probe.wrap_update(statistics_module.UnitStatistics.update)
        wrapped.append("UnitStatistics.update")

    import resource

    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    result = fuse_with_diagnostics(models, data=data, config=config, progress=False, device=spec.get("device"))
    if profiler is not None:
        profiler.disable()
    total = time.perf_counter() - started
    if profiler is not None:
        _emit("profile", text=_profile_report(profiler, spec))

    diagnostics: dict[str, float] = {}
    for d in result.diagnostics:  # heads/qk/vo of one layer share one clock: count the heads entry only
        group = d.space.split(".")[0]
        if group in ("qk", "vo") and config.heads == "aware":
            continue
        diagnostics[group] = diagnostics.get(group, 0.0) + d.seconds
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    _emit(
        "done",
        total=total,
        cpu_seconds=cpu,
        timings=result.timings,
        stages=probe.stages,
        solves=probe.solves,
        update_calls=probe.update_calls,
        update_seconds=probe.update_seconds,
        diagnostics_seconds=diagnostics,
        instrumented=wrapped,
        rss_before=rss_before,
        peak_rss=_peak_rss(),
    )


# ----------------------------------------------------------------------------------------------------
# parent: one child per configuration, tables, targets
# ----------------------------------------------------------------------------------------------------


def run_child(spec: dict, timeout: float | None, threads: int | None) -> dict:
    """Runs one configuration in a fresh interpreter; returns its record, partial if it timed out."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if threads:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[key] = str(threads)
    command = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)]
    if spec.get("nproc", 1) > 1:  # the same child on N processes (gloo on CPU, NCCL on GPUs)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        command = [*launcher, str(spec["nproc"]), *command[1:]]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    events: list[dict] = []
    stderr: list[str] = []

    def read_stdout() -> None:
        for line in process.stdout:
            if line.startswith(EVENT):
                events.append(json.loads(line[len(EVENT) :]))

    def read_stderr() -> None:
        stderr.extend(process.stderr)

    readers = [
        threading.Thread(target=read_stdout, daemon=True),
        threading.Thread(target=read_stderr, daemon=True),
    ]
    for reader in readers:
        reader.start()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    timed_out = False
    fusion_started = None  # the timeout counts from the end of model loading, not from interpreter start
    while process.poll() is None:
        now = time.perf_counter()
        if fusion_started is None and any(event["event"] == "loaded" for event in events):
            fusion_started = now
        deadline = (fusion_started or started + STARTUP_ALLOWANCE_S) + timeout if timeout else None
        if deadline is not None and now > deadline:
            timed_out = True
            os.killpg(process.pid, 9)  # the session this function started: the child and, under torchrun, its workers
            break
        time.sleep(0.2)
    process.wait()
    for reader in readers:
        reader.join(timeout=5)
    wall = time.perf_counter() - started
    fusion_wall = None if fusion_started is None else time.perf_counter() - fusion_started

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    record = {"spec": spec, "wall": wall, "fusion_wall": fusion_wall, "status": "ok"}
    record["returncode"] = process.returncode
    record.update(load_before=load_before, load_after=load_after)
    for event in events:
        if event["event"] == "hello":
            record.update(torch=event["torch"], threads=event["threads"], source_hash=event["source_hash"])
            record.update(processes=event.get("processes", 1))
        elif event["event"] == "loaded":
            record.update(
                parameters=event["parameters"], rss_before=event["rss_before"], batch_size=event["batch_size"]
            )
        elif event["event"] == "profile":
            record["profile"] = event["text"]
    done = [e for e in events if e["event"] == "done"]
    if done:
        record.update({k: v for k, v in done[-1].items() if k not in ("event", "time")})
        return record
    # partial: rebuild what was measured before the child stopped
    stages: dict[str, dict] = {}
    last_progress: dict = {}
    in_progress = None
    last_large_solve = None
    for event in events:
        if event["event"] == "solve_begin":
            last_large_solve = event
        if event["event"] == "stage":
            stages[event["stage"]] = {k: event[k] for k in ("seconds", "calls", "peak_rss", "rss")}
            in_progress = None
        elif event["event"] == "begin":
            in_progress = event["stage"]
        if event["event"] in ("progress", "stage"):
            last_progress = event
    record.update(
        status="timeout" if timed_out else "failed",
        stages=stages,
        stuck_in=in_progress,
        last_large_solve=last_large_solve,
        solves=last_progress.get("solves", {}),
        update_calls=last_progress.get("update_calls"),
        update_seconds=last_progress.get("update_seconds"),
        peak_rss=last_progress.get("peak_rss"),
        stderr_tail="".join(stderr)[-3000:],
    )
    return record


def machine_info(threads: int | None) -> dict:
    import psutil

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for package in ("torch", "transformers", "pot", "numpy", "scipy", "hf-otfusion"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:  # read-only git queries: which commit, and whether the package has uncommitted edits
        git = ["git", "-C", repo]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "hf_otfusion"], capture_output=True, text=True)
        commit = head.strip() + (" + uncommitted package edits" if dirty.stdout.strip() else "")
    except OSError:
        commit = None
    return {
        "commit": commit,
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": psutil.virtual_memory().total / GB,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "threads_requested": threads,
    }


def _fmt(value, width: int, digits: int = 1) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, str):
        return f"{value:>{width}}"
    return f"{value:>{width}.{digits}f}"


def _stage_seconds(record: dict, stage: str) -> float | None:
    entry = record.get("stages", {}).get(stage)
    return None if entry is None else entry["seconds"]


def _label(record: dict) -> str:
    spec = record["spec"]
    tokens = spec.get("tokens_per_sample")
    label = f"{spec['cost']}+{spec['solver']}" + (f" k={tokens}" if tokens else "")
    label += f" x{spec['nproc']}" if spec.get("nproc", 1) > 1 else ""
    label += " disk" if spec.get("from_disk") else ""
    return label + (f" {spec['device']}" if spec.get("device") else "")


def _solve_summary(solves: dict, limit: int = 3) -> str:
    """The solve groups that took the most time, e.g. '3072x3072: 12 x 3.91s'."""
    ranked = sorted(solves.items(), key=lambda item: -item[1][1])[:limit]
    return ", ".join(f"{shape}: {count}x{seconds / count:.3g}s" for shape, (count, seconds) in ranked)


def print_family(family: str, records: list[dict]) -> None:
    header = (
        f"{'config':<22}{'plan s':>8}{'stats s':>9}{'maps s':>9}{'apply+avg s':>12}{'total s':>9}"
        f"{'RSS before GB':>14}{'peak RSS GB':>12}  status"
    )
    print(f"\n== {family}: stage wall times and memory ==")
    print(header)
    print("-" * len(header))
    for r in records:
        apply_avg = _stage_seconds(r, "apply+average")
        total = r.get("total") if r["status"] == "ok" else f">{r['fusion_wall'] or 0:.0f}"
        status = r["status"] if r["status"] == "ok" else f"{r['status']} in {r.get('stuck_in')}"
        cells = [
            f"{_label(r):<22}",
            _fmt(_stage_seconds(r, "plan"), 8, 2),
            _fmt(_stage_seconds(r, "statistics"), 9),
            _fmt(_stage_seconds(r, "maps"), 9),
            _fmt(apply_avg, 12),
            _fmt(total, 9),
            _fmt(_gb(r.get("rss_before")), 14, 2),
            _fmt(_gb(r.get("peak_rss")), 12, 2),
            f"  {status}",
        ]
        print("".join(cells))

    header = f"{'config':<22}{'before':>8}" + "".join(f"{stage:>15}" for stage in STAGES)
    print(f"\n-- {family}: RSS before fusion (current) and process peak RSS at the end of each stage, GB --")
    print(header)
    print("-" * len(header))
    for r in records:
        row = f"{_label(r):<22}{_fmt(_gb(r.get('rss_before')), 8, 2)}"
        for stage in STAGES:
            entry = r.get("stages", {}).get(stage)
            row += _fmt(None if entry is None else _gb(entry["peak_rss"]), 15, 2)
        print(row)

    columns = f"{'fwd s':>8}{'gram s':>8}{'solves':>8}{'solve s':>9}{'maps s':>8}"
    header = f"{'config':<22}{columns}  slowest solve groups"
    print(f"\n-- {family}: where the time goes --")
    print("   statistics = forward passes (fwd) + UnitStatistics.update (gram, float64 accumulation);")
    print(
        "   maps s = wall time of the maps stage: cost building + OT solves, several spaces at once on a thread"
        " each; solve s = solver time summed over threads (count, slowest groups as shape: count x seconds each)"
    )
    print(header)
    print("-" * len(header))
    for r in records:
        stats = _stage_seconds(r, "statistics")
        gram = r.get("update_seconds") if stats is not None or r.get("stuck_in") == "statistics" else None
        forward = None if stats is None or gram is None else stats - gram
        solves = r.get("solves") or {}
        count = sum(c for c, _ in solves.values())
        solve_seconds = sum(s for _, s in solves.values())
        maps = _stage_seconds(r, "maps")
        print(
            f"{_label(r):<22}{_fmt(forward, 8)}{_fmt(gram, 8)}{_fmt(str(count) if solves else None, 8)}"
            f"{_fmt(solve_seconds if solves else None, 9)}{_fmt(maps, 8)}  {_solve_summary(solves)}"
        )


def _gb(value) -> float | None:
    return None if value is None else value / GB


def speedup_lines(records: list[dict]) -> list[str]:
    """Statistics-stage seconds per process count, and the speed-up over one process, per configuration."""
    groups: dict[tuple, dict[int, float | None]] = {}
    for r in records:
        spec = r["spec"]
        key = (spec["family"], spec["cost"], spec["solver"], spec.get("tokens_per_sample"), spec.get("from_disk"))
        groups.setdefault(key, {})[spec.get("nproc", 1)] = _stage_seconds(r, "statistics")
    lines = []
    for (family, cost, solver, _, _), seconds in groups.items():
        if cost != "activations":
            continue
        one = seconds.get(1)
        cells = []
        for n, value in sorted(seconds.items()):
            speedup = f", x{one / value:.2f}" if one and value else ""
            cells.append(f"{n} proc: {_fmt(value, 0).strip()} s{speedup if n > 1 else ''}")
        lines.append(f"{family} {cost}+{solver}: " + "; ".join(cells))
    return lines


def target_lines(records: list[dict]) -> list[str]:
    lines = []
    for r in records:
        name = f"{r['spec']['family']} {_label(r)}"
        limit = TARGET_SECONDS[r["spec"]["cost"]]
        if r["status"] == "ok":
            seconds = r["total"]
            verdict = "PASS" if seconds < limit else "FAIL"
            lines.append(f"{verdict}  {name:<34} fusion time {seconds:8.1f} s  (target < {limit:.0f} s)")
        else:
            so_far = ">" + format(r["fusion_wall"] or 0, ".0f")
            lines.append(f"FAIL  {name:<34} fusion time {so_far:>8} s  ({r['status']})")
        peak = _gb(r.get("peak_rss"))
        if peak is None:
            lines.append(f"FAIL  {name:<34} peak RSS unknown ({r['status']})")
        else:
            verdict = "PASS" if peak < TARGET_RSS_GB and r["status"] == "ok" else "FAIL"
            partial = "" if r["status"] == "ok" else " (so far; run did not finish)"
            lines.append(f"{verdict}  {name:<34} peak RSS {peak:8.2f} GB  (target < {TARGET_RSS_GB:.0f} GB){partial}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=(*FAMILIES, "all"), default="all")
    parser.add_argument("--samples", type=int, default=200, help="alignment samples (activation-based cost)")
    parser.add_argument("--seq-len", type=int, default=128, help="BERT tokens per sample (rows are padded)")
    parser.add_argument("--costs", nargs="+", choices=COSTS, default=list(COSTS))
    parser.add_argument("--solvers", nargs="+", choices=SOLVERS, default=list(SOLVERS))
    parser.add_argument(
        "--batch-size", type=int, default=None, help="activation-pass batch size (default: the package's)"
    )
    parser.add_argument(
        "--tokens-per-sample",
        type=int,
        nargs="+",
        default=[0],
        help="FusionConfig.tokens_per_sample values to run with activation costs (0 = every token)",
    )
    parser.add_argument("--reg", type=float, default=0.05, help="Sinkhorn reg (FusionConfig.reg, relative mode)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (and OMP/MKL threads)")
    parser.add_argument("--small", action="store_true", help="tiny models (64/128/2 layers/4 heads): a smoke run")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds of fusion per configuration (from models loaded); 0 = no limit",
    )
    parser.add_argument("--json", metavar="PATH", help="also write machine-readable results here")
    parser.add_argument(
        "--profile", metavar="DIR", help="run each fusion under cProfile; save .prof files here, print the top"
    )
    parser.add_argument(
        "--nproc", type=int, nargs="+", default=[1],
        help="run each configuration on these numbers of processes (torchrun; gloo on CPU), e.g. --nproc 1 2",
    )  # fmt: skip
    parser.add_argument(
        "--from-disk", metavar="DIR",
        help="save the pair under DIR once and fuse the checkpoints (loaded one at a time) instead of models in memory",
    )  # fmt: skip
    parser.add_argument("--device", help="fuse_with_diagnostics(device=...): cpu, cuda or auto (default: leave as is)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    args = parser.parse_args(argv)

    if args.one:
        run_one(json.loads(args.one))
        return 0

    families = FAMILIES if args.family == "all" else (args.family,)
    machine = machine_info(args.threads)
    versions = machine["versions"]
    print("hf_otfusion engine benchmark")
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"{machine['memory_gb']:.1f} GB RAM, Python {machine['python']}"
    )
    print(
        f"versions: torch {versions['torch']}, transformers {versions['transformers']}, "
        f"POT {versions['pot']}, numpy {versions['numpy']}, scipy {versions['scipy']}, "
        f"hf-otfusion {versions['hf-otfusion']} (commit {machine['commit']})"
    )
    shape = SMALL_SHAPE if args.small else FULL_SHAPE
    print(
        f"models: {'SMALL ' if args.small else ''}hidden {shape['hidden_size']}, "
        f"FFN {shape['intermediate_size']}, "
        f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads; alignment data: "
        f"{args.samples} samples, batch {args.batch_size or 'package default'}, "
        f"BERT seq-len {args.seq_len}; reg {args.reg}; "
        f"timeout {args.timeout:.0f} s per configuration",
    )
    if hasattr(os, "getloadavg"):
        print(
            f"load average at start: {os.getloadavg()[0]:.2f} (other processes on this machine slow the "
            "timings; each configuration line shows the 1-minute load before and after it)",
            flush=True,
        )

    records: list[dict] = []
    for family in families:
        for cost, tokens_per_sample in [
            (c, k) for c in args.costs for k in (args.tokens_per_sample if c == "activations" else [0])
        ]:
            for solver, nproc in [(solver, n) for solver in args.solvers for n in args.nproc]:
                checkpoints = prepare_checkpoints(family, args.small, args.from_disk) if args.from_disk else None
                spec = dict(
                    family=family, cost=cost, solver=solver, small=args.small, samples=args.samples,
                    seq_len=args.seq_len, batch_size=args.batch_size, reg=args.reg, threads=args.threads,
                    profile=args.profile and os.path.abspath(args.profile), tokens_per_sample=tokens_per_sample,
                    nproc=nproc, from_disk=checkpoints and os.path.abspath(checkpoints), device=args.device,
                )  # fmt: skip
                record = run_child(spec, args.timeout or None, args.threads)
                records.append(record)
                total = (
                    f"{record['total']:.1f} s" if record["status"] == "ok" else f">{record['fusion_wall'] or 0:.0f} s"
                )
                cpu = f" (fusion CPU time {record['cpu_seconds']:.0f} s)" if record.get("cpu_seconds") else ""
                print(
                    f"[{family} {_label(record)}] {record['status']}: total {total}{cpu}, peak RSS "
                    f"{_fmt(_gb(record.get('peak_rss')), 0, 2).strip()} GB, "
                    f"torch threads {record.get('threads')}, batch {record.get('batch_size')}, "
                    f"engine sources {record.get('source_hash')}, "
                    f"load average {record['load_before']:.2f} -> {record['load_after']:.2f}",
                    flush=True,
                )
                if record.get("profile"):
                    print(record.pop("profile"))
                if record["status"] != "ok":
                    print(f"    stopped in stage {record.get('stuck_in')}; solves so far: "
                          f"{_solve_summary(record.get('solves') or {}, limit=5) or 'none'}")  # fmt: skip
                    large = record.get("last_large_solve")
                    if large:
                        print(f"    last large solve started: {large['shape']} at {large['elapsed']:.0f} s "
                              "into the fusion")  # fmt: skip
                    if record["status"] == "failed":
                        print("    " + record["stderr_tail"].replace("\n", "\n    "))
    threads = sorted({r.get("threads") for r in records if r.get("threads") is not None})
    print(f"\ntorch threads used: {', '.join(map(str, threads)) or '-'}")
    hashes = sorted({r.get("source_hash") for r in records if r.get("source_hash")})
    print(f"engine sources (sha256 of hf_otfusion/*.py, specs): {', '.join(hashes) or '-'}")
    if len(hashes) > 1:
        print("WARNING: the package changed between configurations; rows measured different engine versions")
    for family in families:
        print_family(family, [r for r in records if r["spec"]["family"] == family])
    if len(args.nproc) > 1:
        print("\n== statistics pass on several processes (wall time of the stage on the main process) ==")
        for line in speedup_lines(records):
            print(line)
    print(f"\n== targets (weight-based < 60 s, activation-based < 180 s, peak RSS < {TARGET_RSS_GB:.0f} GB) ==")
    for line in target_lines(records):
        print(line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "args": vars(args), "results": records}, handle, indent=2)
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

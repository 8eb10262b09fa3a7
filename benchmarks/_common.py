"""Shared pieces of the benchmark scripts: the busy-machine guard, timed subprocesses,
hardware and version info, and the writers of results/benchmarks.{md,jsonl}.

Import this before anything that imports jax or digitjax: importing digitjax rewrites
XLA_FLAGS in os.environ, and the scripts hand children an environment they choose.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# results/<stem>.md and .jsonl; another machine kind records apart (--results benchmarks_h100).
RESULTS_STEM = "benchmarks"
# XLA_FLAGS as the user gave them, before digitjax adds its defaults to os.environ.
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
DEVICE_COUNT_2 = "--xla_force_host_platform_device_count=2"
# The fp32 peak of the CPU the committed figures were measured on (family/model below):
# 2 cores x 2 FMA pipes x 8 fp32 lanes (256 bit) x 2 FLOP x 2.445 GHz. Other CPUs have
# their own (give it with --peak-gflops); none is guessed for them.
CPU_PEAK_GFLOPS = 156.5
CPU_PEAK_FAMILY_MODEL, CPU_PEAK_CORES = "25/17", 2
IDLE_LOAD = 0.5  # 1-minute load average above which the machine counts as busy
VERSIONED = ("jax", "jaxlib", "flax", "optax")

# Sections of results/benchmarks.md, in the order the file lists them.
SECTIONS = ("throughput", "seeds", "time_to_accuracy", "startup", "data_parallel")


def md_header(stem: str) -> str:
    """The opening of results/STEM.md: who writes it and how to regenerate it."""
    text = ("Written by the scripts in `benchmarks/` (see `benchmarks/README.md`): each script "
            f"rewrites its own section below and appends one JSON line to `results/{stem}.jsonl`. ")
    if stem == RESULTS_STEM:
        title = "# Benchmarks"
        text += ("Regenerate everything on an idle machine with `bash benchmarks/run_all.sh` "
                 "(about 25 minutes on 2 CPU cores). A section marked BUSY was measured while "
                 "other work ran (`--force`): its figures are not comparable.")
    elif stem.startswith(f"{RESULTS_STEM}_cpu_"):
        kind = stem.removeprefix(f"{RESULTS_STEM}_cpu_")
        title = f"# Benchmarks: CPU {kind}"
        text += ("These are another CPU's figures, kept apart from the 2-core EPYC's in "
                 f"`results/{RESULTS_STEM}.md`: on an idle machine of that kind, run the scripts "
                 f"with `--results {stem}` to regenerate them. A section marked BUSY was "
                 "measured while other work ran (`--force`): its figures are not comparable.")
    else:
        kind = stem.removeprefix(f"{RESULTS_STEM}_")
        title = f"# Benchmarks: {kind}"
        text += ("These are another machine kind's figures, kept apart from the 2-core CPU's: "
                 f"`bash benchmarks/run_gpu.sh {kind}` regenerates them on a GPU (or any "
                 f"script with `--results {stem}`). The busy-machine guard is sized for the "
                 "2-core CPU, so there the scripts run with `--force` and their sections say "
                 "BUSY.")
    return f"{title}\n\n{textwrap.fill(text, 91)}\n"


# --- the busy-machine guard --------------------------------------------------------------

def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="run even when the machine is busy; the result is marked BUSY")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for the load average to fall before refusing "
                   "(the 1-minute average lags: ~2 minutes after a previous benchmark)")
    p.add_argument("--max-load", type=float, default=IDLE_LOAD,
                   help=f"1-minute load average counted as idle (default {IDLE_LOAD})")
    p.add_argument("--no-record", action="store_true",
                   help="print the result only; leave results/ untouched")
    p.add_argument("--results", default=RESULTS_STEM, metavar="STEM",
                   help="write results/STEM.md and .jsonl (default benchmarks; e.g. "
                   "benchmarks_h100 for figures of another machine kind)")


def check_idle(args) -> dict:
    """Exit 3 when the machine is busy, unless --force (then the result is marked BUSY).

    Two cores shared with a test run or a sweep halve the figures, so a busy machine is
    refused rather than measured.
    """
    load = os.getloadavg()[0]
    deadline = time.monotonic() + args.wait_idle
    if load > args.max_load and args.wait_idle > 0 and not args.force:
        print(f"load average {load:.2f} > {args.max_load}: waiting up to {args.wait_idle:.0f} s "
              "for the machine to go idle", file=sys.stderr, flush=True)
        while load > args.max_load and time.monotonic() < deadline:
            time.sleep(5)
            load = os.getloadavg()[0]
    busy = load > args.max_load
    if busy and not args.force:
        print(f"benchmark refused: the machine is busy (1-minute load average {load:.2f} > "
              f"{args.max_load}); stop the other work, or pass --force to measure anyway "
              "(marked BUSY)", file=sys.stderr)
        sys.exit(3)
    if busy:
        print(f"warning: busy machine (load average {load:.2f}); the result is marked BUSY",
              file=sys.stderr, flush=True)
    return {"load_1min_before": round(load, 2), "busy": busy, "max_load": args.max_load}


# --- hardware and versions ----------------------------------------------------------------

def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, v in
            (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def _cpu_mhz() -> float | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
    return float(m.group(1)) if m else None


def _vector_isa(flags: list[str]) -> str:
    for isa in ("avx512f", "avx2", "avx"):
        if isa in flags:
            return isa.removesuffix("f").upper().replace("AVX512", "AVX-512")
    return "?"


def git_commit() -> str | None:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "") if head.returncode == 0 else None


def environment() -> dict:
    """Hardware, versions, XLA_FLAGS and date; reads metadata only (jax is not imported)."""
    cpu = _lscpu()
    cores = None
    if cpu.get("Core(s) per socket", "").isdigit() and cpu.get("Socket(s)", "").isdigit():
        cores = int(cpu["Core(s) per socket"]) * int(cpu["Socket(s)"])
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu.get("Model name") or platform.processor(),
        # Family/model tell CPU generations apart where the model name is generic (VMs).
        "cpu_family_model": f"{cpu.get('CPU family')}/{cpu.get('Model')}",
        "cpu_vector_isa": _vector_isa(cpu.get("Flags", "").split()),
        "cpu_cores": cores,
        "cpus": os.cpu_count(),
        "cpu_mhz": _cpu_mhz(),
        "gpu": _gpu(),
        "versions": versions,
        "python": platform.python_version(),
        "xla_flags": USER_XLA_FLAGS,
        "git_commit": git_commit(),
    }


def _gpu() -> str | None:
    """The GPU's name and driver, when nvidia-smi answers."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


def alternating(modes: list[str], repeats: int) -> list[str]:
    """Modes in rounds, every other round reversed, so drift in the machine hits all alike."""
    return [m for r in range(repeats) for m in (modes if r % 2 == 0 else modes[::-1])]


def failed(name: str, proc, out: dict, timeout: float) -> bool:
    """For a child that failed: keep its output tail in `out`, say why on stderr."""
    if proc.returncode == 0:
        return False
    out["tail"] = proc.tail()
    why = f"timed out after {timeout:.0f} s, killed" if proc.timed_out else \
        f"exit {proc.returncode}"
    print(f"{name} failed ({why}):\n{proc.tail()}", file=sys.stderr, flush=True)
    return True


def command_line() -> str:
    """The exact command that ran this script, relative to the repository root."""
    argv = list(sys.argv)
    try:
        argv[0] = str(Path(argv[0]).resolve().relative_to(ROOT))
    except ValueError:
        pass
    return shlex.join(["python", *argv])


def digitjax_command() -> list[str]:
    """The `digitjax` console script of this interpreter's environment, as a user runs it."""
    script = Path(sys.executable).parent / "digitjax"
    return [str(script)] if script.exists() else [sys.executable, "-m", "digitjax"]


def child_env(xla_flags: str = USER_XLA_FLAGS, **extra: str) -> dict[str, str]:
    """os.environ with XLA_FLAGS set exactly (digitjax adds its default in the child)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    env.setdefault("WANDB_MODE", "disabled")  # belt and braces: no W&B in benchmarks
    env.update(extra)
    return env


# --- timed subprocesses -------------------------------------------------------------------

@dataclasses.dataclass
class Proc:
    returncode: int
    wall_seconds: float  # from just before the spawn to the exit
    max_rss_bytes: int  # peak resident set size of the child (and its waited-for children)
    timed_out: bool
    stdout: str
    stderr: str
    spawned_at: float  # time.time() just before the spawn

    def tail(self, n: int = 15) -> str:
        return "\n".join((self.stdout + self.stderr).strip().splitlines()[-n:])


def run_process(cmd: list[str], *, timeout: float, env: dict | None = None,
                cwd: Path = ROOT) -> Proc:
    """Run `cmd` to its exit, timed; its process group is killed after `timeout` seconds.

    os.wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would mix in earlier
    children). A hung child (e.g. a collective's rendezvous with too few threads) is killed
    rather than left to block the benchmark.
    """
    timed_out = threading.Event()

    def kill_group(pid):
        timed_out.set()
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        spawned_at = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        timer = threading.Timer(timeout, kill_group, (proc.pid,))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: take the child down with us
            kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Proc(returncode=proc.returncode, wall_seconds=wall,
                    max_rss_bytes=usage.ru_maxrss * 1024,  # Linux reports KiB
                    timed_out=timed_out.is_set(),
                    stdout=out.read().decode(errors="replace"),
                    stderr=err.read().decode(errors="replace"), spawned_at=spawned_at)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def median(values: list[float]) -> float | None:
    v = sorted(values)
    if not v:
        return None
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, (sum((x - m) ** 2 for x in values) / (len(values) - 1)) ** 0.5


# --- results/benchmarks.md and .jsonl ------------------------------------------------------

def fmt(x, spec: str = ",.1f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _section_header(title: str, env: dict, guard: dict, command: str) -> str:
    v = env["versions"]
    versions = ", ".join(f"{k} {v.get(k)}" for k in VERSIONED)
    cores = f"{env['cpu_cores']} cores" if env["cpu_cores"] else f"{env['cpus']} CPUs"
    mhz = f", {env['cpu_mhz']:.0f} MHz" if env.get("cpu_mhz") else ""
    load = guard["load_1min_before"]
    status = (f"**BUSY** (1-minute load average {load} before the start, run with "
              "`--force`): figures not comparable" if guard["busy"]
              else f"idle (1-minute load average {load} before the start)")
    return "\n".join([
        f"## {title}",
        "",
        f"- Measured: {env['date']}, git {env['git_commit']}",
        f"- Machine: {status}",
        f"- Hardware: {env['cpu_model']} (family/model {env['cpu_family_model']}, "
        f"{env['cpu_vector_isa']}), {cores}{mhz}"
        + (f"; GPU {env['gpu']}" if env.get("gpu") else ""),
        f"- Versions: {versions}, Python {env['python']}",
        f"- XLA_FLAGS given: `{env['xla_flags'] or '(none)'}` (digitjax adds its CPU default "
        "unless DIGITJAX_XLA_DEFAULTS=0)",
        f"- Command: `{command}`",
        "",
        "",
    ])


def _read_sections(results_md: Path) -> dict[str, str]:
    if not results_md.exists():
        return {}
    text = results_md.read_text()
    found = re.findall(r"<!-- begin (\w+) -->\n(.*?)<!-- end \1 -->\n", text, re.S)
    return dict(found)


def record(name: str, title: str, env: dict, guard: dict, results: dict, body_md: str,
           *, enabled: bool = True, stem: str = RESULTS_STEM) -> dict:
    """Print the result, append it to results/benchmarks.jsonl and rewrite its section."""
    command = command_line()
    line = {"benchmark": name, "command": command, **guard, "environment": env,
            "results": results}
    print(json.dumps(line, sort_keys=True))
    section = _section_header(title, env, guard, command) + body_md.rstrip() + "\n"
    print("\n" + section)
    if not enabled:
        return line
    results_md = ROOT / "results" / f"{stem}.md"
    results_jsonl = results_md.with_suffix(".jsonl")
    results_md.parent.mkdir(parents=True, exist_ok=True)
    with open(results_jsonl, "a") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")
    sections = _read_sections(results_md)
    sections[name] = section
    parts = [md_header(stem)]
    for key in [*SECTIONS, *sorted(set(sections) - set(SECTIONS))]:
        if key in sections:
            parts.append(f"<!-- begin {key} -->\n{sections[key]}<!-- end {key} -->\n")
    tmp = results_md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, results_md)
    print(f"wrote {results_md.relative_to(ROOT)} ({name}) and appended to "
          f"{results_jsonl.relative_to(ROOT)}", file=sys.stderr)
    return line

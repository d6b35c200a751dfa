#!/usr/bin/env python3
"""pydlit benchmark: pydlit against skopeo on real local registries.

    python bench/bench.py [--scenario NAME ...] [--reps N] [--quick] [--json FILE]
    python bench/bench.py --profile FILE          # py-spy profile of the single-target copy
    python bench/bench.py --summarise-profile FILE

Everything runs on 127.0.0.1: one source registry holding the test images, fresh target
registries for every run (so neither pydlit's mount memory nor skopeo's blob-info cache can turn
a copy into a mount), the real pydlit service as a subprocess, and skopeo/curl as baselines.
Each scenario runs `--reps` times, alternating which tool goes first; medians are compared.
See bench/README.md for what each scenario measures and the goals it is judged against.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
GiB = 1024 * MiB
POLL_S = 0.05
QUIET_SHARE = 0.15  # a rep starts once other processes use less than this share of the CPUs
SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"
CURL = shutil.which("curl") or "/usr/bin/curl"
SCENARIOS = ("fanout", "single", "small", "resync", "resources")


def _require_tools() -> None:
    missing = [(tool, pkg) for tool, pkg in (
        (SKOPEO, "skopeo"), ("/usr/bin/docker-registry", "docker-registry"), (CURL, "curl"),
    ) if not os.access(tool, os.X_OK)]
    if missing:
        pkgs = " ".join(pkg for _, pkg in missing)
        print(f"bench: missing {', '.join(t for t, _ in missing)}; install with:\n"
              f"    apt-get install -y {pkgs}", file=sys.stderr)
        sys.exit(2)


_require_tools()
sys.path.insert(0, str(REPO_ROOT / "tests"))

from support.images import Image, _layer_specs, manifest_digest, push_image  # noqa: E402
from support.proxy import FaultProxy  # noqa: E402
from support.registry import Registry, free_port  # noqa: E402
from support.service import ServiceProcess, job_body, job_state  # noqa: E402


class BenchError(Exception):
    pass


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    reps: int
    fanout_layers: tuple[int, ...]
    big_layers: tuple[int, ...]
    small_images: int
    small_layers: tuple[int, ...]
    fanout_rate: int = 64 * MiB  # bytes/s of the source link in the fan-out scenario
    fanout_targets: int = 3
    resource_targets: int = 3
    small_skopeo_parallel: int = 4
    resync_samples_per_rep: int = 3  # the re-sync copy is sub-second: more samples, same cost


def make_config(quick: bool, reps: int | None) -> Config:
    if quick:
        return Config(reps=reps or 1, fanout_layers=(16 * MiB,) * 4, big_layers=(32 * MiB,) * 4,
                      small_images=40, small_layers=(256 * 1024,) * 3)
    return Config(reps=reps or 3, fanout_layers=(64 * MiB,) * 4, big_layers=(128 * MiB,) * 4,
                  small_images=40, small_layers=(256 * 1024,) * 3)


# -- machine ------------------------------------------------------------------------------------


def _cmd_out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"? ({exc})"


def machine_info() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    import aiohttp

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "skopeo": _cmd_out([SKOPEO, "--version"]),
        "docker-registry": _cmd_out(["/usr/bin/docker-registry", "--version"]),
        "curl": _cmd_out([CURL, "--version"]).splitlines()[0] if os.access(CURL, os.X_OK) else "?",
    }


# -- processes ----------------------------------------------------------------------------------


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


class CpuWatch:
    """CPU time the whole machine spent vs what this run (bench, registries, services, skopeo,
    curl: all children, reaped) spent: the rest is other people's load, which skews timings."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = self._busy()
        self.own0 = self._own()

    @staticmethod
    def _busy() -> float:
        # user nice system idle iowait irq softirq steal ...
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK

    @staticmethod
    def _own() -> float:
        """This process, its reaped children (RUSAGE_CHILDREN) and its live ones (/proc)."""
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + sum(map(_cpu_or_0, live_children()))

    def foreign(self) -> tuple[float, float]:
        """(cpu-seconds used by other processes, as a share of the machine's capacity)."""
        wall = time.perf_counter() - self.t0
        other = max(0.0, (self._busy() - self.busy0) - (self._own() - self.own0))
        return other, other / (wall * (os.cpu_count() or 1))


class Busy:
    """The machine's CPU use (all processes) over a block, as a share of all cores: near 100%
    the run is CPU-bound on this machine, whoever's CPU it is. Also the CPU seconds the given
    registries spent in it: on 2 cores they take most of it, so the tool that asks less of them
    is faster."""

    share = float("nan")
    registries = float("nan")

    def __init__(self, regs: list[Registry]) -> None:
        self._pids = [r.pid for r in regs if r.pid is not None]

    def _registry_cpu(self) -> float:
        return sum(map(_cpu_or_0, self._pids))

    def __enter__(self) -> "Busy":
        self.b0, self.r0, self.t0 = CpuWatch._busy(), self._registry_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        self.share = (CpuWatch._busy() - self.b0) / (wall * (os.cpu_count() or 1)) if wall > 0 else float("nan")
        self.registries = self._registry_cpu() - self.r0


def live_children() -> list[int]:
    me = os.getpid()
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            out.append(int(entry.name))
    return out


def _cpu_or_0(pid: int) -> float:
    try:
        return proc_cpu(pid)
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class ChildRun:
    wall: float
    cpu: float
    maxrss_kib: int


def run_child(cmd: list[str], what: str) -> ChildRun:
    """Run a process to its end; its own rusage via wait4 (not polluted by other children)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise BenchError(f"{what} exited {proc.returncode}: {err.read()[-2000:].decode(errors='replace')}")
    return ChildRun(wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss)


def skopeo_copy(src_host: str, src_ref: str, dst_host: str, dst_ref: str, dest_creds: str | None = None) -> ChildRun:
    # --preserve-digests: the byte-for-byte copy pydlit makes (and no chance of recompression).
    cmd = [SKOPEO, "copy", "--quiet", "--insecure-policy", "--preserve-digests",
           "--src-tls-verify=false", "--dest-tls-verify=false",
           *(["--dest-creds", dest_creds] if dest_creds else []),
           f"docker://{src_host}/{src_ref}", f"docker://{dst_host}/{dst_ref}"]
    return run_child(cmd, f"skopeo copy {src_ref} -> {dst_host}/{dst_ref}")


def skopeo_many(copies: list[tuple[str, str, str, str]], parallel: int) -> tuple[float, float]:
    """(wall, summed cpu) of skopeo copies, `parallel` at a time."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        runs = list(pool.map(lambda c: skopeo_copy(*c), copies))
    return time.perf_counter() - t0, sum(r.cpu for r in runs)


# -- registries ---------------------------------------------------------------------------------


class Registries:
    """Fresh registries (plain unless asked) on ports never used before in this run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._used: set[int] = set()
        self._n = 0
        self._trash: list[Path] = []

    def new(self, label: str, kind: str = "plain") -> Registry:
        port = free_port()
        while port in self._used:
            port = free_port()
        self._used.add(port)
        self._n += 1
        reg = Registry(self.root / f"{self._n:03d}-{label}", kind, port=port)
        return reg.start()

    def drop(self, regs: list[Registry]) -> None:
        """Stop them now; their storage goes at the next sweep()."""
        for reg in regs:
            reg.stop()
            self._trash.append(reg.dir)

    def sweep(self) -> float:
        """Delete dropped registries' storage and sync; seconds taken. Called between scenarios,
        never between reps: on a disk with online discard (this VM's ext4) the deletes keep the
        filesystem busy long after rmtree returns, and a rep measured meanwhile saw its target
        registry's kernel time grow 2-4x (0.8 -> 2.1 cpu-s in three reps of the same 40 images)."""
        t0 = time.perf_counter()
        for d in self._trash:
            shutil.rmtree(d, ignore_errors=True)
        self._trash.clear()
        os.sync()
        return time.perf_counter() - t0


def check_copied(reg: Registry, repo: str, tag: str, image: Image, who: str) -> None:
    got = manifest_digest(reg, repo, tag)
    if got != image.digest:
        raise BenchError(f"{who}: {reg.host}/{repo}:{tag} holds {got}, expected {image.digest}")


# -- pydlit -------------------------------------------------------------------------------------


class SnapshotService(ServiceProcess):
    """The service run from a frozen copy of the pydlit package, not from the live work tree:
    every scenario of a run measures the same code, even while someone edits pydlit/."""

    code_dir: Path

    @property
    def command(self) -> list[str]:
        boot = ("import sys, runpy; sys.argv[0] = 'pydlit'; "
                f"sys.path.insert(0, {str(self.code_dir)!r}); "
                "runpy.run_module('pydlit', run_name='__main__', alter_sys=True)")
        return [sys.executable, "-c", boot, "--host", "127.0.0.1",
                "--port", str(self.port), "--db", str(self.db_path)]


def snapshot_code(root: Path, rev: str | None, code: Path | None = None) -> tuple[Path, str]:
    """Copy pydlit/ (the work tree, a git revision, or another tree's) under root; (dir, description)."""
    dest = root / "code"
    dest.mkdir()
    def copy_tree(src: Path) -> None:
        # pydlit/migrations is a relative symlink to ../migrations: copy both, keep the link.
        for part in ("pydlit", "migrations"):
            if (src / part).is_dir():
                shutil.copytree(src / part, dest / part, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__"))

    if code is not None:
        if not (code / "pydlit" / "__main__.py").is_file():
            raise BenchError(f"--code {code}: no pydlit/__main__.py there")
        copy_tree(code)
        desc = f"pydlit/ from {code}"
    elif rev:
        full = _cmd_out(["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"])
        if not re.fullmatch(r"[0-9a-f]{40}", full):
            raise BenchError(f"--rev {rev!r} is not a commit of {REPO_ROOT}")
        parts = [p for p in ("pydlit", "migrations")
                 if _cmd_out(["git", "-C", str(REPO_ROOT), "ls-tree", "--name-only", full, p])]
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", full, *parts],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        desc = f"git {full[:10]} ({_cmd_out(['git', '-C', str(REPO_ROOT), 'log', '-1', '--format=%s', full])[:60]})"
    else:
        copy_tree(REPO_ROOT)
        head = _cmd_out(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
        dirty = _cmd_out(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "pydlit"])
        desc = f"work tree at start (HEAD {head}{', pydlit/ has uncommitted changes' if dirty else ''})"
    h = hashlib.sha256()
    for f in sorted(dest.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(dest)).encode() + b"\0" + f.read_bytes())
    return dest, f"{desc}; sources sha256 {h.hexdigest()[:12]}"


class Service:
    """The pydlit service (real subprocess), its job submission and timing."""

    code_dir: Path | None = None  # set once per run by main()

    def __init__(self, root: Path, env: dict[str, str], label: str) -> None:
        workdir = Path(tempfile.mkdtemp(prefix=f"pydlit-{label}-", dir=root))
        if Service.code_dir is not None:
            self.proc = SnapshotService(workdir, env)
            self.proc.code_dir = Service.code_dir
        else:
            self.proc = ServiceProcess(workdir, env)
        self.last_exact = float("nan")

    def __enter__(self) -> Service:
        self.proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def _post(self, body: dict[str, Any]) -> str:
        return self.proc.submit(body)

    def run_jobs(self, bodies: list[dict[str, Any]], timeout: float = 600.0) -> tuple[float, list[dict[str, Any]]]:
        """Wall seconds from the first POST until every job is observed FINISHED (50 ms polls).

        Jobs are awaited in submission order, one poll stream at a time: the poll load stays at
        20 requests/s however many jobs run, and the last observation is within one poll
        interval of the last job's finish."""
        t0, t0_epoch = time.perf_counter(), time.time()
        if len(bodies) == 1:
            ids = [self._post(bodies[0])]
        else:
            with ThreadPoolExecutor(min(len(bodies), 40)) as pool:
                ids = list(pool.map(self._post, bodies))
        deadline = t0 + timeout
        done = []
        for job_id in ids:
            while True:
                status = self.proc.status(job_id)
                state = job_state(status)
                if state == "FINISHED":
                    done.append(status)
                    break
                if state == "FAILED":
                    raise BenchError(f"pydlit job {job_id} FAILED: {json.dumps(status)[:2000]}\n"
                                     f"service log tail:\n{self.proc.log_tail()}")
                if time.perf_counter() > deadline:
                    raise BenchError(f"pydlit job {job_id} not finished after {timeout}s: {status}")
                time.sleep(POLL_S)
        wall = time.perf_counter() - t0
        # The same span without the poll quantisation: the service's own finished_at (same clock).
        self.last_exact = max(datetime.fromisoformat(s["finished_at"]).timestamp() for s in done) - t0_epoch
        return wall, done


def _span(status: dict[str, Any], a: str, b: str) -> float:
    return datetime.fromisoformat(status[b]).timestamp() - datetime.fromisoformat(status[a]).timestamp()


def body_for(src: Any, repo: str, tag: str, targets: list[tuple[Registry, str]]) -> dict[str, Any]:
    return job_body(src, repo, tag, [(reg, {"image": dst_repo, "ref": tag}) for reg, dst_repo in targets])


# -- results ------------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    variant: str
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)  # machine CPU use during each run, 0..1
    reg_cpu: list[float] = field(default_factory=list)  # the registries' CPU seconds in each run
    note: str = ""

    def machine(self, b: Busy) -> None:
        """What the whole machine and the registries spent during one run."""
        self.busy.append(b.share)
        self.reg_cpu.append(b.registries)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")


@dataclass
class Goal:
    name: str
    text: str  # what was measured, formatted
    ok: bool | None  # None: not measured


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, scenario: str, variant: str) -> Row:
        r = Row(scenario, variant)
        self.rows.append(r)
        return r


def fmt_s(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- scenarios ----------------------------------------------------------------------------------


@dataclass
class World:
    cfg: Config
    root: Path
    regs: Registries
    source: Registry
    env: dict[str, str]
    images: dict[str, Image] = field(default_factory=dict)
    wait_quiet: float = 0.0  # seconds to wait for other load to go away before each measured run
    busy_reps: int = 0  # reps that started while the machine was still busy
    watch: CpuWatch | None = None  # other processes' CPU during the reps (not the waits)
    foreign_cpu: float = 0.0
    measured_s: float = 0.0

    def close_watch(self) -> None:
        if self.watch is not None:
            wall = time.perf_counter() - self.watch.t0
            other, _ = self.watch.foreign()
            self.foreign_cpu += other
            self.measured_s += wall
            self.watch = None

    def quiet(self) -> None:
        """Before each measured run: sync, then wait (bounded) until other processes leave the
        CPUs alone: on a 2-core machine a neighbour's test run halves whatever is being timed."""
        self.close_watch()
        try:
            # The previous run's writes reach the disk now, not during the next measurement.
            os.sync()
            self._wait_quiet()
        finally:
            self.watch = CpuWatch()

    def _wait_quiet(self) -> None:
        if self.wait_quiet <= 0:
            return
        deadline = time.perf_counter() + self.wait_quiet
        said = False
        while True:
            watch = CpuWatch()
            time.sleep(1.0)
            _, share = watch.foreign()
            if share < QUIET_SHARE:
                if said:
                    log(f"  machine quiet again ({100 * share:.0f}% busy)")
                return
            if time.perf_counter() > deadline:
                log(f"  machine still {100 * share:.0f}% busy with other processes after "
                    f"{self.wait_quiet:.0f} s; going on")
                self.busy_reps += 1
                return
            if not said:
                log(f"  other processes keep {100 * share:.0f}% of the CPUs busy; waiting up to "
                    f"{self.wait_quiet:.0f} s")
                said = True

    def image(self, name: str) -> Image:
        if name not in self.images:
            t0 = time.perf_counter()
            cfg = self.cfg
            if name == "fanout":
                self.images[name] = push_image(self.source, "bench/fanout", "v1", "schema2", cfg.fanout_layers, seed=101)
            elif name == "big":
                self.images[name] = push_image(self.source, "bench/big", "v1", "schema2", cfg.big_layers, seed=102)
            elif name == "small":
                for i in range(cfg.small_images):
                    self.images[f"small{i}"] = push_image(
                        self.source, f"bench/small{i:02d}", "v1", "schema2", cfg.small_layers, seed=1000 + i)
                self.images[name] = self.images["small0"]
            else:
                raise KeyError(name)
            log(f"built image {name} in {time.perf_counter() - t0:.1f} s")
        return self.images[name]

    def service(self, label: str) -> Service:
        return Service(self.root, self.env, label)


def image_bytes(img: Image) -> int:
    return img.total_bytes


def manifests_bytes(img: Image) -> int:
    return sum(len(b) for _, b in img.manifests.values())


def order(w: World, rep: int, a: Callable[[], None], b: Callable[[], None], settle: bool = True) -> None:
    """Alternate which tool goes first, so neither always meets a warm page cache; unless told
    otherwise (runs of a few ms that write nothing), each starts on a settled machine: the other's
    writes flushed, other load gone."""
    for fn in ((a, b) if rep % 2 == 0 else (b, a)):
        if settle:
            w.quiet()
        fn()


def scenario_fanout(w: World, res: Results) -> None:
    cfg = w.cfg
    img = w.image("fanout")
    n = cfg.fanout_targets
    log(f"fanout: {img.total_bytes / MiB:.0f} MiB in {len(cfg.fanout_layers)} layers to {n} targets, "
        f"source link {cfg.fanout_rate / MiB:.0f} MiB/s")
    proxy = FaultProxy(w.source).start()
    proxy.rate_limit(cfg.fanout_rate, download=True, upload=False)
    r_py = res.row("fanout", f"pydlit 1 job -> {n} targets")
    r_seq = res.row("fanout", f"skopeo {n} copies in sequence")
    r_par = res.row("fanout", f"skopeo {n} copies in parallel")
    src_ratios: list[float] = []
    want = image_bytes(img) + manifests_bytes(img)
    try:
        with w.service("fanout") as svc:
            for rep in range(cfg.reps):
                def run_pydlit(rep: int = rep) -> None:
                    targets = [w.regs.new(f"fan-py{i}") for i in range(n)]
                    try:
                        proxy.reset_counters()
                        body = body_for(proxy, "bench/fanout", "v1", [(t, f"fan/py-r{rep}") for t in targets])
                        c0 = proc_cpu(svc.pid)
                        with Busy([w.source, *targets]) as b:
                            wall, _ = svc.run_jobs([body])
                        r_py.machine(b)
                        r_py.cpu.append(proc_cpu(svc.pid) - c0)
                        got = proxy.downloaded_bytes()
                        for t in targets:
                            check_copied(t, f"fan/py-r{rep}", "v1", img, "pydlit")
                        r_py.times.append(wall)
                        src_ratios.append(got / want)
                        log(f"  rep {rep + 1} pydlit {fmt_s(wall)}, source bytes {got / MiB:.1f} MiB ({got / want:.3f}x)")
                    finally:
                        w.regs.drop(targets)

                def run_skopeo(rep: int = rep) -> None:
                    for mode, row, par in (("seq", r_seq, 1), ("par", r_par, n)):
                        if mode == "par":
                            w.quiet()
                        targets = [w.regs.new(f"fan-sk{mode}{i}") for i in range(n)]
                        try:
                            proxy.reset_counters()
                            copies = [(proxy.host, "bench/fanout:v1", t.host, f"fan/sk{mode}-r{rep}:v1") for t in targets]
                            with Busy([w.source, *targets]) as b:
                                wall, cpu = skopeo_many(copies, par)
                            row.machine(b)
                            for t in targets:
                                check_copied(t, f"fan/sk{mode}-r{rep}", "v1", img, "skopeo")
                            row.times.append(wall)
                            row.cpu.append(cpu)
                            log(f"  rep {rep + 1} skopeo {mode} {fmt_s(wall)}, source bytes "
                                f"{proxy.downloaded_bytes() / MiB:.1f} MiB")
                        finally:
                            w.regs.drop(targets)

                order(w, rep, run_pydlit, run_skopeo)
    finally:
        proxy.stop()
    best = min(r_seq.median, r_par.median)
    best_name = "sequence" if r_seq.median <= r_par.median else "parallel"
    ratio = r_py.median / best
    worst_src = max(src_ratios)
    r_py.note = f"{ratio:.2f}x best skopeo ({best_name}); source read {worst_src:.3f}x image+manifests"
    res.extra["fanout"] = {"image_bytes": image_bytes(img), "manifest_bytes": manifests_bytes(img),
                           "source_ratios": src_ratios}
    res.goals.append(Goal("fan-out source reads",
                          f"source bytes {worst_src:.3f}x image+manifests (worst rep; goal <= 1.05x)",
                          worst_src <= 1.05))
    res.goals.append(Goal("fan-out time",
                          f"pydlit {fmt_s(r_py.median)} = {ratio:.3f}x best skopeo ({best_name}, "
                          f"{fmt_s(best)}) (goal <= 0.45x)", ratio <= 0.45))


def _write_layers(w: World, img: Image, seed: int, sizes: tuple[int, ...]) -> list[tuple[Path, str]]:
    out = []
    layer_dir = w.root / "layers"
    layer_dir.mkdir(exist_ok=True)
    for i, spec in enumerate(_layer_specs(seed, sizes, "p0")):
        path = layer_dir / f"big-layer{i}.bin"
        if not path.exists():
            with open(path, "wb") as f:
                for chunk in spec.chunks(4 * MiB):
                    f.write(chunk)
        digest = spec.digest()
        if digest not in img.blobs:
            raise BenchError(f"layer file {path} ({digest}) is not a blob of the image")
        out.append((path, digest))
    return out


def curl_ingest(reg: Registry, repo: str, layers: list[tuple[Path, str]]) -> float:
    """The registry's ingest ceiling: every layer as one monolithic POST + PUT, all at once."""
    def one(item: tuple[Path, str]) -> None:
        path, digest = item
        post = subprocess.run([CURL, "-sS", "-f", "-o", "/dev/null", "-D", "-", "-X", "POST",
                               "-H", "Content-Length: 0", f"{reg.url}/v2/{repo}/blobs/uploads/"],
                              capture_output=True, text=True, check=True)
        m = re.search(r"^Location:\s*(\S+)", post.stdout, re.IGNORECASE | re.MULTILINE)
        if not m:
            raise BenchError(f"no Location in POST answer: {post.stdout!r}")
        loc = m.group(1)
        if loc.startswith("/"):
            loc = reg.url + loc
        url = loc + ("&" if "?" in loc else "?") + "digest=" + digest
        run_child([CURL, "-sS", "-f", "-o", "/dev/null", "-X", "PUT", "-H", "Expect:",
                   "-H", "Content-Type: application/octet-stream", "--data-binary", f"@{path}", url],
                  f"curl PUT {path.name}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(layers)) as pool:
        list(pool.map(one, layers))
    wall = time.perf_counter() - t0
    for _, digest in layers:
        req = urllib.request.Request(f"{reg.url}/v2/{repo}/blobs/{digest}", method="HEAD")
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.status != 200:
                raise BenchError(f"curl ingest: {digest} not stored")
    return wall


def scenario_single(w: World, res: Results) -> None:
    cfg = w.cfg
    img = w.image("big")
    log(f"single: {img.total_bytes / MiB:.0f} MiB in {len(cfg.big_layers)} layers, local registries")
    layers = _write_layers(w, img, 102, cfg.big_layers)
    r_py = res.row("single", "pydlit 1 job -> 1 target")
    r_sk = res.row("single", "skopeo copy")
    r_cu = res.row("single", f"ceiling: curl {len(layers)} layer PUTs at once")
    with w.service("single") as svc:
        for rep in range(cfg.reps):
            def run_pydlit(rep: int = rep) -> None:
                t = w.regs.new("single-py")
                try:
                    c0 = proc_cpu(svc.pid)
                    with Busy([w.source, t]) as b:
                        wall, _ = svc.run_jobs([body_for(w.source, "bench/big", "v1", [(t, f"single/py-r{rep}")])])
                    r_py.machine(b)
                    r_py.cpu.append(proc_cpu(svc.pid) - c0)
                    check_copied(t, f"single/py-r{rep}", "v1", img, "pydlit")
                    r_py.times.append(wall)
                    log(f"  rep {rep + 1} pydlit {fmt_s(wall)}")
                finally:
                    w.regs.drop([t])

            def run_others(rep: int = rep) -> None:
                t = w.regs.new("single-sk")
                try:
                    with Busy([w.source, t]) as b:
                        run = skopeo_copy(w.source.host, "bench/big:v1", t.host, f"single/sk-r{rep}:v1")
                    r_sk.machine(b)
                    check_copied(t, f"single/sk-r{rep}", "v1", img, "skopeo")
                    r_sk.times.append(run.wall)
                    r_sk.cpu.append(run.cpu)
                    log(f"  rep {rep + 1} skopeo {fmt_s(run.wall)}")
                finally:
                    w.regs.drop([t])
                t = w.regs.new("single-curl")
                try:
                    with Busy([t]) as b:
                        wall = curl_ingest(t, f"single/curl-r{rep}", layers)
                    r_cu.machine(b)
                    r_cu.times.append(wall)
                    log(f"  rep {rep + 1} curl ceiling {fmt_s(wall)}")
                finally:
                    w.regs.drop([t])

            order(w, rep, run_pydlit, run_others)
    shutil.rmtree(w.root / "layers", ignore_errors=True)
    vs_sk, vs_cu = r_py.median / r_sk.median, r_py.median / r_cu.median
    mibs = img.total_bytes / MiB
    r_py.note = f"{vs_sk:.2f}x skopeo, {vs_cu:.2f}x ceiling; {mibs / r_py.median:.0f} MiB/s"
    r_sk.note = f"{mibs / r_sk.median:.0f} MiB/s"
    r_cu.note = f"{mibs / r_cu.median:.0f} MiB/s"
    res.goals.append(Goal("single vs skopeo", f"pydlit {fmt_s(r_py.median)} = {vs_sk:.3f}x skopeo "
                          f"({fmt_s(r_sk.median)}) (goal <= 1.0x)", vs_sk <= 1.0))
    res.goals.append(Goal("single vs ceiling", f"pydlit {fmt_s(r_py.median)} = {vs_cu:.3f}x registry ingest "
                          f"ceiling ({fmt_s(r_cu.median)}) (goal <= 1.3x)", vs_cu <= 1.3))


def scenario_small(w: World, res: Results) -> None:
    cfg = w.cfg
    w.image("small")
    n = cfg.small_images
    imgs = [w.images[f"small{i}"] for i in range(n)]
    log(f"small: {n} images of {len(cfg.small_layers)} x {cfg.small_layers[0] // 1024} KiB")
    r_py = res.row("small", f"pydlit {n} jobs at once")
    r_sk = res.row("small", f"skopeo {n} copies, {cfg.small_skopeo_parallel} at a time")
    job_runs: list[float] = []
    with w.service("small") as svc:
        for rep in range(cfg.reps):
            def run_pydlit(rep: int = rep) -> None:
                t = w.regs.new("small-py")
                try:
                    bodies = [body_for(w.source, f"bench/small{i:02d}", "v1", [(t, f"small/py-r{rep}-{i:02d}")])
                              for i in range(n)]
                    c0 = proc_cpu(svc.pid)
                    with Busy([w.source, t]) as b:
                        wall, statuses = svc.run_jobs(bodies)
                    r_py.machine(b)
                    r_py.cpu.append(proc_cpu(svc.pid) - c0)
                    runs = [_span(st, "started_at", "finished_at") for st in statuses]
                    waits = [_span(st, "created_at", "started_at") for st in statuses]
                    job_runs.extend(runs)
                    log(f"  rep {rep + 1} pydlit jobs: run median {fmt_s(statistics.median(runs))} "
                        f"(max {fmt_s(max(runs))}), queue wait max {fmt_s(max(waits))}")
                    for i, img in enumerate(imgs):
                        check_copied(t, f"small/py-r{rep}-{i:02d}", "v1", img, "pydlit")
                    r_py.times.append(wall)
                    log(f"  rep {rep + 1} pydlit {fmt_s(wall)}")
                finally:
                    w.regs.drop([t])

            def run_skopeo(rep: int = rep) -> None:
                t = w.regs.new("small-sk")
                try:
                    copies = [(w.source.host, f"bench/small{i:02d}:v1", t.host, f"small/sk-r{rep}-{i:02d}:v1")
                              for i in range(n)]
                    with Busy([w.source, t]) as b:
                        wall, cpu = skopeo_many(copies, cfg.small_skopeo_parallel)
                    r_sk.machine(b)
                    for i, img in enumerate(imgs):
                        check_copied(t, f"small/sk-r{rep}-{i:02d}", "v1", img, "skopeo")
                    r_sk.times.append(wall)
                    r_sk.cpu.append(cpu)
                    log(f"  rep {rep + 1} skopeo {fmt_s(wall)}")
                finally:
                    w.regs.drop([t])

            order(w, rep, run_pydlit, run_skopeo)
    ratio = r_py.median / r_sk.median
    # Each rep's two runs sat side by side, so their ratio is the least touched by the VM's drift;
    # and the run is CPU-bound, so the ratio of everything's CPU tells how far the wall time can go.
    paired = sorted(a / b for a, b in zip(r_py.times, r_sk.times))
    total_cpu = [(a + ra) / (b + rb) for a, ra, b, rb in zip(r_py.cpu, r_py.reg_cpu, r_sk.cpu, r_sk.reg_cpu)]
    r_py.note = (f"{ratio:.2f}x skopeo (rep by rep {paired[0]:.2f}-{paired[-1]:.2f}); tool + registries CPU "
                 f"{statistics.median(total_cpu):.2f}x; {n / r_py.median:.1f} images/s; one job runs "
                 f"{fmt_s(statistics.median(job_runs))} (median)")
    r_sk.note = f"{n / r_sk.median:.1f} images/s"
    res.goals.append(Goal("many small images", f"pydlit {fmt_s(r_py.median)} = {ratio:.3f}x skopeo "
                          f"({fmt_s(r_sk.median)}) (goal <= 0.5x)", ratio <= 0.5))


def scenario_resync(w: World, res: Results) -> None:
    cfg = w.cfg
    img = w.image("big")
    samples = cfg.reps * cfg.resync_samples_per_rep
    log(f"resync: {img.total_bytes / MiB:.0f} MiB image already at the target, {samples} samples each")
    r_py = res.row("resync", "pydlit job (already there)")
    r_sk = res.row("resync", "skopeo copy (already there)")
    polled: list[float] = []
    t = w.regs.new("resync")
    try:
        skopeo_copy(w.source.host, "bench/big:v1", t.host, "resync/big:v1")  # the initial copy
        check_copied(t, "resync/big", "v1", img, "skopeo")
        with w.service("resync") as svc:
            body = body_for(w.source, "bench/big", "v1", [(t, "resync/big")])
            svc.run_jobs([body])  # warm-up: first connections, first job
            for i in range(samples):
                if i % cfg.resync_samples_per_rep == 0:
                    w.quiet()

                def run_pydlit() -> None:
                    c0 = proc_cpu(svc.pid)
                    wall, _ = svc.run_jobs([body])
                    r_py.cpu.append(proc_cpu(svc.pid) - c0)
                    # A sub-100 ms span: judged by POST start -> the job's finished_at, since a
                    # 50 ms poll would round it up to the next poll.
                    r_py.times.append(svc.last_exact)
                    polled.append(wall)

                def run_skopeo() -> None:
                    run = skopeo_copy(w.source.host, "bench/big:v1", t.host, "resync/big:v1")
                    r_sk.times.append(run.wall)
                    r_sk.cpu.append(run.cpu)

                order(w, i, run_pydlit, run_skopeo, settle=False)
            log(f"  pydlit {' '.join(fmt_s(x) for x in r_py.times)} (polled: {' '.join(fmt_s(x) for x in polled)})")
            log(f"  skopeo {' '.join(fmt_s(x) for x in r_sk.times)}")
        check_copied(t, "resync/big", "v1", img, "re-sync")
    finally:
        w.regs.drop([t])
    ratio = r_py.median / r_sk.median
    r_py.note = (f"{ratio:.2f}x skopeo; POST -> finished_at (seen by {POLL_S * 1000:.0f} ms polls after "
                 f"{fmt_s(statistics.median(polled))})")
    res.goals.append(Goal("re-sync", f"pydlit {fmt_s(r_py.median)} = {ratio:.3f}x skopeo "
                          f"({fmt_s(r_sk.median)}) (goal <= 0.5x)", ratio <= 0.5))


def scenario_resources(w: World, res: Results) -> None:
    cfg = w.cfg
    img = w.image("big")
    n = cfg.resource_targets
    moved = img.total_bytes * n / GiB
    log(f"resources: {img.total_bytes / MiB:.0f} MiB to {n} targets ({moved:.2f} GiB moved), fresh service each rep")
    r_py = res.row("resources", f"pydlit 1 job -> {n} targets")
    r_sk = res.row("resources", f"skopeo {n} copies in sequence")
    peaks: list[int] = []
    rss_idle: list[int] = []
    sk_rss: list[int] = []
    for rep in range(cfg.reps):
        def run_pydlit(rep: int = rep) -> None:
            targets = [w.regs.new(f"res-py{i}") for i in range(n)]
            try:
                with w.service(f"res{rep}") as svc:
                    rss_idle.append(proc_status_kib(svc.pid, "VmRSS"))
                    c0 = proc_cpu(svc.pid)
                    with Busy([w.source, *targets]) as b:
                        wall, _ = svc.run_jobs([body_for(w.source, "bench/big", "v1", [(t, f"res/py-r{rep}") for t in targets])])
                    r_py.machine(b)
                    cpu = proc_cpu(svc.pid) - c0
                    peak = proc_status_kib(svc.pid, "VmHWM")
                for t in targets:
                    check_copied(t, f"res/py-r{rep}", "v1", img, "pydlit")
                r_py.times.append(wall)
                r_py.cpu.append(cpu)
                peaks.append(peak)
                log(f"  rep {rep + 1} pydlit {fmt_s(wall)}, cpu {cpu:.2f} s, peak RSS {peak / 1024:.0f} MiB")
            finally:
                w.regs.drop(targets)

        def run_skopeo(rep: int = rep) -> None:
            targets = [w.regs.new(f"res-sk{i}") for i in range(n)]
            try:
                with Busy([w.source, *targets]) as b:
                    runs = [skopeo_copy(w.source.host, "bench/big:v1", t.host, f"res/sk-r{rep}:v1") for t in targets]
                r_sk.machine(b)
                for t in targets:
                    check_copied(t, f"res/sk-r{rep}", "v1", img, "skopeo")
                r_sk.times.append(sum(r.wall for r in runs))
                r_sk.cpu.append(sum(r.cpu for r in runs))
                sk_rss.append(max(r.maxrss_kib for r in runs))
                log(f"  rep {rep + 1} skopeo {fmt_s(r_sk.times[-1])}, cpu {r_sk.cpu[-1]:.2f} s")
            finally:
                w.regs.drop(targets)

        order(w, rep, run_pydlit, run_skopeo)
    py_per_gib, sk_per_gib = r_py.cpu_median / moved, r_sk.cpu_median / moved
    peak = max(peaks) / 1024
    r_py.note = (f"peak RSS {peak:.0f} MiB (idle {statistics.median(rss_idle) / 1024:.0f}); "
                 f"{py_per_gib:.2f} cpu-s/GiB = {py_per_gib / sk_per_gib:.2f}x skopeo")
    r_sk.note = f"max RSS {max(sk_rss) / 1024:.0f} MiB per process; {sk_per_gib:.2f} cpu-s/GiB"
    res.goals.append(Goal("peak RSS", f"service VmHWM {peak:.0f} MiB copying {img.total_bytes / MiB:.0f} MiB to "
                          f"{n} targets (goal <= 150 MiB)", peak <= 150))
    res.goals.append(Goal("CPU per GiB", f"pydlit {py_per_gib:.2f} cpu-s/GiB = {py_per_gib / sk_per_gib:.3f}x "
                          f"skopeo ({sk_per_gib:.2f}) (goal <= 0.5x)", py_per_gib <= 0.5 * sk_per_gib))


RUNNERS: dict[str, Callable[[World, Results], None]] = {
    "fanout": scenario_fanout, "single": scenario_single, "small": scenario_small,
    "resync": scenario_resync, "resources": scenario_resources,
}
GOAL_NAMES = {
    "fanout": ["fan-out source reads", "fan-out time"],
    "single": ["single vs skopeo", "single vs ceiling"],
    "small": ["many small images"],
    "resync": ["re-sync"],
    "resources": ["peak RSS", "CPU per GiB"],
}


# -- report -------------------------------------------------------------------------------------


def print_table(res: Results) -> None:
    headers = ("scenario", "variant", "median", "runs", "cpu s", "reg cpu s", "mach%", "notes")
    lines = []
    for r in res.rows:
        runs = " ".join(fmt_s(t).replace(" ", "") for t in r.times)
        cpu = f"{r.cpu_median:.2f}" if r.cpu else "-"
        reg_cpu = f"{statistics.median(r.reg_cpu):.2f}" if r.reg_cpu else "-"
        busy = f"{100 * statistics.median(r.busy):.0f}%" if r.busy else "-"
        lines.append((r.scenario, r.variant, fmt_s(r.median), runs, cpu, reg_cpu, busy, r.note))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    widths[-1] = 0
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers).rstrip())
    print("  ".join("-" * max(w, 5) for w in widths))
    last = None
    for line in lines:
        shown = ("" if line[0] == last else line[0],) + line[1:]
        last = line[0]
        print(fmt.format(*shown).rstrip())


def print_goals(res: Results, ran: list[str]) -> None:
    by_name = {g.name: g for g in res.goals}
    for scen in SCENARIOS:
        for name in GOAL_NAMES[scen]:
            g = by_name.get(name)
            if g is None:
                why = "scenario failed" if scen in ran else "scenario not run"
                print(f"SKIP  {name:<21} ({why})")
            else:
                print(f"{'PASS' if g.ok else 'MISS'}  {name:<21} {g.text}")


# -- profile ------------------------------------------------------------------------------------


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame_key(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('func')} ({path})"


def summarise_profile(path: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from a py-spy raw (collapsed) file."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_key(f) for f in stack.split(";") if f]
        if frames and frames[0].startswith(("thread (", "process ")):
            frames = frames[1:]
        if not frames:
            continue
        self_c[frames[-1]] += n
        for key in set(frames):
            incl[key] += n
    if not total:
        return f"{path}: no samples"
    out = [f"{path}: {total} samples (non-idle)", "", f"top {top} by self time:"]
    out += [f"  {100 * c / total:5.1f}%  {k}" for k, c in self_c.most_common(top)]
    out += ["", f"top {top} by inclusive time:"]
    out += [f"  {100 * c / total:5.1f}%  {k}" for k, c in incl.most_common(top)]
    return "\n".join(out)


def run_profile(w: World, out: Path, rate: int, flags: list[str], scenario: str) -> None:
    """One scenario's pydlit copy with py-spy sampling the service (py-spy attaches by pid)."""
    spy = shutil.which("py-spy")
    if not spy:
        raise BenchError("py-spy is not installed: pip install py-spy")
    cfg = w.cfg
    proxy: FaultProxy | None = None
    if scenario == "fanout":
        proxy = FaultProxy(w.source).start()
        proxy.rate_limit(cfg.fanout_rate, download=True, upload=False)
    name = {"single": "big", "fanout": "fanout", "resources": "big", "small": "small"}[scenario]
    w.image(name)

    def plan(tag: str) -> tuple[list[Registry], list[dict[str, Any]], Callable[[], None]]:
        """Fresh targets, the job bodies, and the check that they were copied."""
        if scenario == "small":
            t = w.regs.new("profile")
            bodies = [body_for(w.source, f"bench/small{i:02d}", "v1", [(t, f"profile/{tag}-{i:02d}")])
                      for i in range(cfg.small_images)]

            def check_small() -> None:
                for i in range(cfg.small_images):
                    check_copied(t, f"profile/{tag}-{i:02d}", "v1", w.images[f"small{i}"], "pydlit")
            return [t], bodies, check_small
        n = 1 if scenario == "single" else cfg.fanout_targets if scenario == "fanout" else cfg.resource_targets
        targets = [w.regs.new("profile") for _ in range(n)]
        src = proxy if proxy is not None else w.source
        repo = "bench/fanout" if scenario == "fanout" else "bench/big"
        body = body_for(src, repo, "v1", [(t, f"profile/{tag}") for t in targets])

        def check() -> None:
            for t in targets:
                check_copied(t, f"profile/{tag}", "v1", w.images[name], "pydlit")
        return targets, [body], check

    regs: list[Registry] = []
    try:
        with w.service("profile") as svc:
            regs, bodies, _ = plan("warm")
            svc.run_jobs(bodies)  # warm-up: imports, first connections, SQLite pages
            w.regs.drop(regs)
            regs, bodies, check = plan("run")
            rec = subprocess.Popen([spy, "record", "-p", str(svc.pid), "-o", str(out), "-f", "raw",
                                    "-r", str(rate), *flags],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            w.quiet()  # (also gives py-spy a second to attach)
            if rec.poll() is not None:
                raise BenchError(f"py-spy exited at once: {rec.stderr.read() if rec.stderr else ''}")
            c0 = proc_cpu(svc.pid)
            wall, _ = svc.run_jobs(bodies)
            cpu = proc_cpu(svc.pid) - c0
            rec.send_signal(signal.SIGINT)
            _, err = rec.communicate(timeout=60)
            check()
        said = (err or "").strip().splitlines()
        log(f"profiled {scenario} copy: {fmt_s(wall)} wall, {cpu:.2f} cpu-s in the service "
            f"({100 * cpu / wall:.0f}% of one core); py-spy: {said[-2] if len(said) > 1 else said}")
    finally:
        w.regs.drop(regs)
        if proxy is not None:
            proxy.stop()
    print(summarise_profile(out))


# -- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", choices=SCENARIOS,
                    help="run only this scenario (repeatable); default: all")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per scenario (default 3, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="1 rep and smaller images: a smoke run")
    ap.add_argument("--pydlit-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the service, e.g. PYDLIT_CHUNK_MIB=64 (repeatable)")
    ap.add_argument("--tmp", type=Path, default=None, help="where registries keep their storage (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (registry and service logs)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--profile", type=Path, default=None, metavar="FILE",
                    help="instead of the scenarios: py-spy raw profile of the single-target copy, then a summary")
    ap.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    ap.add_argument("--profile-scenario", default="single", choices=("single", "fanout", "small", "resources"),
                    help="which scenario's pydlit copy --profile samples (default single)")
    ap.add_argument("--profile-flags", default="", metavar="FLAGS",
                    help="extra py-spy record flags, e.g. '--native' or '--idle --threads'")
    ap.add_argument("--rev", default=None, help="benchmark this git revision's pydlit/ (default: the work tree)")
    ap.add_argument("--code", type=Path, default=None, metavar="DIR",
                    help="benchmark DIR/pydlit instead (e.g. an experimental copy of the package)")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="run the service from the live work tree instead of a copy taken at start")
    ap.add_argument("--wait-quiet", type=float, default=90.0, metavar="S",
                    help="before each measured run wait up to S seconds for other processes to leave the CPUs "
                         "alone (default 90; 0: don't wait)")
    ap.add_argument("--summarise-profile", type=Path, default=None, metavar="FILE",
                    help="only summarise an existing py-spy raw file")
    args = ap.parse_args()

    if args.summarise_profile:
        print(summarise_profile(args.summarise_profile))
        return 0
    cfg = make_config(args.quick, args.reps)
    env = {"PYDLIT_LOG_LEVEL": "INFO"}
    for item in args.pydlit_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("PYDLIT_"):
            ap.error(f"--pydlit-env wants PYDLIT_NAME=VALUE, not {item!r}")
        env[key] = value
    scenarios = list(dict.fromkeys(args.scenario or SCENARIOS))

    info = machine_info()
    print("pydlit benchmark" + (" (--quick)" if args.quick else ""))
    for k, v in info.items():
        print(f"  {k:<16} {v}")
    shown = f"profile of {args.profile_scenario}" if args.profile else ", ".join(scenarios)
    print(f"  {'reps':<16} {cfg.reps}; scenarios: {shown}")
    extra_env = {k: v for k, v in env.items() if k != "PYDLIT_LOG_LEVEL"}
    print(f"  {'pydlit env':<16} {extra_env or 'defaults'}")

    root = Path(tempfile.mkdtemp(prefix="pydlit-bench-", dir=args.tmp))
    regs = Registries(root)
    res = Results()
    started = time.perf_counter()
    failures: list[str] = []
    warnings: list[str] = []
    source: Registry | None = None
    world_ref: list[World] = []
    code_desc = "live work tree (no snapshot)"
    try:
        if not args.no_snapshot:
            Service.code_dir, code_desc = snapshot_code(root, args.rev, args.code)
        print(f"  {'pydlit code':<16} {code_desc}")
        print(f"  {'load average':<16} {' '.join(Path('/proc/loadavg').read_text().split()[:3])} at start")
        print(flush=True)
        source = regs.new("source")
        world = World(cfg, root, regs, source, env, wait_quiet=args.wait_quiet)
        world_ref.append(world)
        if args.profile:
            run_profile(world, args.profile, args.profile_rate, args.profile_flags.split(), args.profile_scenario)
            return 0
        for name in scenarios:
            t0 = time.perf_counter()
            world.foreign_cpu = world.measured_s = 0.0
            world.watch = CpuWatch()
            try:
                RUNNERS[name](world, res)
            except Exception as exc:  # one broken scenario must not hide the others
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                log(f"scenario {name} FAILED: {type(exc).__name__}: {exc}")
            world.close_watch()
            swept = regs.sweep()
            if swept > 1:
                log(f"  deleting this scenario's target registries took {swept:.1f} s")
            other = world.foreign_cpu
            share = other / (world.measured_s * (os.cpu_count() or 1)) if world.measured_s else 0.0
            res.extra.setdefault("foreign_cpu", {})[name] = other
            busy_note = (f"; while it measured, other processes used {other:.1f} cpu-s "
                         f"({100 * share:.0f}% of the machine)")
            if share > 0.10:
                warnings.append(f"scenario {name}: other processes (or kernel threads) used {100 * share:.0f}% of "
                                f"the CPUs ({other:.1f} cpu-s) while it measured; its timings are skewed")
            log(f"scenario {name} took {time.perf_counter() - t0:.0f} s{busy_note}")
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if source is not None:
            source.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"results (medians of {cfg.reps} rep(s); total bench time {time.perf_counter() - started:.0f} s)")
    print()
    print_table(res)
    print("cpu s: CPU seconds of the pydlit service (/proc/PID/stat delta) or of the skopeo processes "
          "(wait4 rusage), median\nreg cpu s: CPU seconds of the registries the run used (source and "
          "targets), median\nmach%: the whole machine's CPU use during the run (registries, proxy, "
          "everything) as a share of all cores, median")
    print()
    if args.quick:
        print("(--quick: smaller images and 1 rep; fixed per-job costs weigh more, so judge the goals on a full run)")
    print_goals(res, scenarios)
    for f in failures:
        print(f"ERROR {f}")
    if world_ref and world_ref[0].busy_reps:
        warnings.append(f"{world_ref[0].busy_reps} rep(s) started while other processes still kept the CPUs busy")
    for warn in warnings:
        print(f"WARN  {warn}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": info, "config": cfg.__dict__, "env": env,
            "rows": [r.__dict__ for r in res.rows],
            "goals": [g.__dict__ for g in res.goals], "extra": res.extra, "failures": failures,
            "warnings": warnings, "code": code_desc,
        }, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

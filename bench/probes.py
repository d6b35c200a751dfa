#!/usr/bin/env python3
"""Measurements behind the README's performance notes that bench.py's scenarios do not make.

    python bench/probes.py registry-cost [--calls 400]
        CPU seconds the registry's own process spends per request, by kind of request: what any
        client's requests cost it, whoever sends them.
    python bench/probes.py long-link [--latency-ms 25] [--jobs 12] [--rev REV]
        One small image per job (3 x 256 KiB, a new repository each) through proxies that hold
        every request for the given time: the median of the jobs' own run time (started_at to
        finished_at), which counts the round trips that come one after another.
    python bench/probes.py one-registry [--repos 3] [--reps 3] [--separate] [--rev REV]
        One job copying a 256 MiB image (4 layers) to several repositories of one registry (with
        --separate: one job per repository, submitted together): the run time and the blob bytes
        that registry was sent (through a counting proxy).
    python bench/probes.py slow-target [--targets 4] [--rate-mib 8 | --hang] [--rev REV]
        One job copying a 256 MiB image (8 layers) to several registries, one of them behind a
        proxy that takes uploads at the given rate, or (--hang) that, once that target holds a
        quarter of the image, holds every new request unanswered: when each healthy target
        finished, when the job ended, and how much of the source was read.
    python bench/probes.py slow-jobs [--jobs 2] [--rate-mib 8] [--hang] [--slow-source] [--rev REV]
        Jobs copying a 256 MiB image (8 layers, each its own) to one slow registry (behind a proxy that
        takes uploads at the given rate, shared by them, and with --hang answers no new request
        from 3 s in; with --slow-source, that registry is their source and serves at that rate),
        then, 3 s in, one job copying a 64 MiB image (4 layers) between healthy registries: how
        long that job took, while the service's stream slots were wanted by both.
    python bench/probes.py cancel [--targets 3] [--at 0.4] [--rev REV]
        One job copying a 512 MiB image (4 layers) to several registries, cancelled (DELETE) once
        that share of it is sent: how long the job took to end, and the bytes its upload
        sessions still hold on the registries' disks once it has.
    python bench/probes.py tls [--reps 3] [--rev REV]
        The single-target copy of bench.py (512 MiB, 4 layers, from a plain registry) to a fresh
        https registry with htpasswd Basic auth each time: pydlit's job against `skopeo copy
        --dest-creds`, in alternating order, and each tool's CPU seconds: what TLS costs each.

Everything runs on 127.0.0.1, with the registries and the service of bench.py.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

import aiohttp
from bench import Registries, Service, body_for, proc_cpu, skopeo_copy, snapshot_code  # also puts tests/ on sys.path
from support.images import push_image
from support.proxy import FaultProxy
from support.registry import Registry
from support.service import job_state

SMALL = 256 * 1024


async def _registry_cost(reg: Registry, calls: int) -> None:
    base = f"{reg.url}/v2/"
    pid = reg.pid
    blobs = [os.urandom(SMALL) for _ in range(calls)]
    digests = ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]
    configs = [json.dumps({"architecture": "amd64", "os": "linux", "n": i}).encode() for i in range(calls)]
    config_digests = ["sha256:" + hashlib.sha256(c).hexdigest() for c in configs]
    sessions: list[str] = [""] * calls
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit_per_host=8)) as s:

        async def measure(what: str, one: Callable[[int], Awaitable[None]]) -> None:
            gate = asyncio.Semaphore(8)

            async def gated(i: int) -> None:
                async with gate:
                    await one(i)

            before = proc_cpu(pid)
            await asyncio.gather(*(gated(i) for i in range(calls)))
            await asyncio.sleep(0.3)  # what the registry still does after its answers
            print(f"  {what:36s} {1000 * (proc_cpu(pid) - before) / calls:5.2f} ms", flush=True)

        async def call(method: str, url: str, expect: int, **kw: object) -> aiohttp.ClientResponse:
            async with s.request(method, url, **kw) as resp:  # type: ignore[arg-type]
                await resp.read()
                if resp.status != expect:
                    raise SystemExit(f"{method} {url}: HTTP {resp.status}, expected {expect}")
                return resp

        async def post(i: int) -> None:
            resp = await call("POST", base + f"r/n{i}/blobs/uploads/", 202)
            sessions[i] = resp.headers["Location"]

        async def put(i: int) -> None:
            await call("PUT", sessions[i], 201, params={"digest": digests[i]}, data=blobs[i])

        async def config(i: int) -> None:
            resp = await call("POST", base + f"r/n{i}/blobs/uploads/", 202)
            await call("PUT", resp.headers["Location"], 201, params={"digest": config_digests[i]}, data=configs[i])

        async def manifest(i: int) -> None:
            body = json.dumps({
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digests[i], "size": len(configs[i])},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digests[i], "size": SMALL}],
            }).encode()
            await call("PUT", base + f"r/n{i}/manifests/v1", 201, data=body,
                       headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})

        print(f"registry CPU per request ({calls} calls, 8 at a time):")
        await measure("HEAD tag, repository unknown", lambda i: call("HEAD", base + f"q/n{i}/manifests/v1", 404))
        await measure("GET tags/list, repository unknown", lambda i: call("GET", base + f"q/n{i}/tags/list", 404))
        await measure("POST upload session", post)
        await measure("PUT 256 KiB (commit with the bytes)", put)
        await measure("POST + PUT of a small config blob", config)
        await measure("HEAD blob, present", lambda i: call("HEAD", base + f"r/n{i}/blobs/{digests[i]}", 200))
        await measure("GET blob, 256 KiB", lambda i: call("GET", base + f"r/n{i}/blobs/{digests[i]}", 200))
        await measure("PUT manifest", manifest)
        await measure("GET manifest", lambda i: call(
            "GET", base + f"r/n{i}/manifests/v1", 200, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}))


def registry_cost(root: Path, calls: int) -> None:
    regs = Registries(root)
    reg = regs.new("cost")
    try:
        asyncio.run(_registry_cost(reg, calls))
    finally:
        regs.drop([reg])
        regs.sweep()


def long_link(root: Path, latency_s: float, jobs: int, rev: str | None) -> None:
    Service.code_dir, described = snapshot_code(root, rev)
    regs = Registries(root)
    source, target = regs.new("source"), regs.new("target")
    proxies = [FaultProxy(source).start(), FaultProxy(target).start()]
    try:
        for i in range(jobs):
            push_image(source, f"link/img{i:02d}", "v1", layer_sizes=(SMALL,) * 3, seed=5000 + i)
        for proxy in proxies:
            proxy.latency_s = latency_s
        runs = []
        with Service(root, {}, "long-link") as svc:
            for i in range(jobs):
                _, [status] = svc.run_jobs([body_for(proxies[0], f"link/img{i:02d}", "v1", [(proxies[1], f"link/out{i:02d}")])])
                started, finished = (datetime.fromisoformat(status[k]).timestamp() for k in ("started_at", "finished_at"))
                runs.append(finished - started)
        print(f"pydlit: {described}")
        print(f"{jobs} jobs, one after another, every request held {latency_s * 1000:.0f} ms: job run median "
              f"{statistics.median(runs) * 1000:.0f} ms (min {min(runs) * 1000:.0f}, max {max(runs) * 1000:.0f}); "
              f"requests: source {proxies[0].count()}, target {proxies[1].count()}")
    finally:
        for proxy in proxies:
            proxy.stop()
        regs.drop([source, target])
        regs.sweep()


def one_registry(root: Path, repos: int, reps: int, separate: bool, rev: str | None) -> None:
    Service.code_dir, described = snapshot_code(root, rev)
    regs = Registries(root)
    source = regs.new("source")
    image = push_image(source, "one/img", "v1", layer_sizes=(64 * 1024 * 1024,) * 4, seed=6000)
    runs, sent = [], []
    try:
        for rep in range(reps):
            target = regs.new(f"one-{rep}")
            proxy = FaultProxy(target).start()
            try:
                outs = [(proxy, f"one/out{i}") for i in range(repos)]
                with Service(root, {}, "one-registry") as svc:
                    if separate:
                        wall, _ = svc.run_jobs([body_for(source, "one/img", "v1", [out]) for out in outs])
                        runs.append(wall)
                    else:
                        _, [status] = svc.run_jobs([body_for(source, "one/img", "v1", outs)])
                        started, finished = (datetime.fromisoformat(status[k]).timestamp() for k in ("started_at", "finished_at"))
                        runs.append(finished - started)
                sent.append(proxy.blob_upload_bytes())
            finally:
                proxy.stop()
                regs.drop([target])
        print(f"pydlit: {described}")
        print(f"{image.total_bytes / 2**20:.0f} MiB to {repos} repositories of one registry "
              f"({f'{repos} jobs, wall time' if separate else 'one job, its run time'}), {reps} reps: median "
              f"{statistics.median(runs):.2f} s (min {min(runs):.2f}, max {max(runs):.2f}); blob bytes sent to the "
              f"registry {statistics.median(sent) / image.total_bytes:.2f}x the image")
    finally:
        regs.drop([source])
        regs.sweep()


def slow_target(root: Path, targets: int, rate_mib: float, hang: bool, rev: str | None) -> None:
    Service.code_dir, described = snapshot_code(root, rev)
    regs = Registries(root)
    source = regs.new("source")
    image = push_image(source, "slow/img", "v1", layer_sizes=(32 * 1024 * 1024,) * 8, seed=7000)
    counted = FaultProxy(source).start()
    sinks = [regs.new(f"slow-{i}") for i in range(targets)]
    slow = FaultProxy(sinks[-1]).start()
    if not hang:
        slow.rate_limit(rate_mib * 2**20, download=False)
    try:
        with Service(root, {}, "slow-target") as svc:
            job = svc.proc.submit(body_for(counted, "slow/img", "v1", [(reg, "slow/out") for reg in [*sinks[:-1], slow]]))
            began, finished, status = time.monotonic(), {}, {}
            # Until every healthy target is done, and the job too unless its slow target hangs.
            for _ in range(60_000):
                status = svc.proc.status(job)
                if hang and not slow.latency_s and status["targets"][-1]["bytes_done"] * 4 >= image.total_bytes:
                    slow.latency_s = 3600.0  # from now on it takes connections and answers none
                for idx, t in enumerate(status["targets"]):
                    if t["state"] in ("FINISHED", "FAILED") and idx not in finished:
                        finished[idx] = time.monotonic() - began
                if job_state(status) in ("FINISHED", "FAILED") or (hang and len(finished) >= targets - 1):
                    break
                time.sleep(0.05)
            left = [line for line in svc.proc.log_text().splitlines() if "on its own" in line]
        healthy = [finished.get(i, float("nan")) for i in range(targets - 1)]
        print(f"pydlit: {described}")
        print(f"{image.total_bytes / 2**20:.0f} MiB (8 layers) to {targets} registries, the last "
              f"{'answering nothing from a quarter of the way' if hang else f'taking uploads at {rate_mib:g} MiB/s'}: healthy targets "
              f"finished at {min(healthy):.1f}-{max(healthy):.1f} s; the slow one "
              f"{'still waiting' if targets - 1 not in finished else f'ended at {finished[targets - 1]:.1f} s'} "
              f"({status['targets'][-1]['state']}); source read {counted.downloaded_bytes() / image.total_bytes:.2f}x the image")
        print("\n".join(["the service on targets leaving the shared reads:", *left]))
    finally:
        counted.stop()
        slow.stop()
        regs.drop([source, *sinks])
        regs.sweep()


def slow_jobs(root: Path, jobs: int, rate_mib: float, hang: bool, from_slow: bool, rev: str | None) -> None:
    Service.code_dir, described = snapshot_code(root, rev)
    regs = Registries(root)
    source, healthy, far = regs.new("source"), regs.new("healthy"), regs.new("slow")
    # The slow registry is the busy jobs' target, or with --slow-source their source. Each job
    # its own image: jobs copying the same blobs to one registry would share their uploads.
    big = [push_image(far if from_slow else source, f"busy/img{i}", "v1", layer_sizes=(32 * 1024 * 1024,) * 8, seed=8000 + i)
           for i in range(jobs)][0]
    small = push_image(source, "quick/img", "v1", layer_sizes=(16 * 1024 * 1024,) * 4, seed=8001)
    slow = FaultProxy(far).start()
    slow.rate_limit(rate_mib * 2**20, download=from_slow, upload=not from_slow)
    busy_from, busy_to = (slow, healthy) if from_slow else (source, slow)
    try:
        with Service(root, {}, "slow-jobs") as svc:
            busy = [svc.proc.submit(body_for(busy_from, f"busy/img{i}", "v1", [(busy_to, f"busy/out{i}")])) for i in range(jobs)]
            time.sleep(3.0)
            if hang:
                slow.latency_s = 3600.0  # from now on it takes connections and answers none
            before = [svc.proc.status(job)["targets"][0]["bytes_done"] for job in busy]
            began = time.monotonic()
            quick = svc.proc.submit(body_for(source, "quick/img", "v1", [(healthy, "quick/out")]))
            status = svc.proc.wait(quick, timeout=900.0)
            took = time.monotonic() - began
            for job in busy:
                svc.proc._call("DELETE", f"/api/distribute/image/{job}")
            gave_way = [line for line in svc.proc.log_text().splitlines() if "gives its stream slot" in line]
        pace = f"{'serving' if from_slow else 'taking uploads'} at {rate_mib:g} MiB/s"
        print(f"pydlit: {described}")
        print(f"{jobs} jobs of {big.total_bytes / 2**20:.0f} MiB (8 layers) {'from' if from_slow else 'to'} one registry "
              f"{pace}{' and answering no new request from 3 s in' if hang else ''} "
              f"(holding {', '.join(f'{b / 2**20:.0f}' for b in before)} MiB 3 s in); then "
              f"{small.total_bytes / 2**20:.0f} MiB (4 layers) between healthy registries: "
              f"{job_state(status)} {took:.1f} s after its submission; stream slots given way: {len(gave_way)}")
        print("\n".join(gave_way))
    finally:
        slow.stop()
        regs.drop([source, healthy, far])
        regs.sweep()


def cancel(root: Path, targets: int, at: float, rev: str | None) -> None:
    Service.code_dir, described = snapshot_code(root, rev)
    regs = Registries(root)
    source = regs.new("source")
    image = push_image(source, "cancel/img", "v1", layer_sizes=(128 * 1024 * 1024,) * 4, seed=9000)
    sinks = [regs.new(f"cancel-{i}") for i in range(targets)]
    try:
        with Service(root, {}, "cancel") as svc:
            job = svc.proc.submit(body_for(source, "cancel/img", "v1", [(reg, "cancel/out") for reg in sinks]))
            status: dict = {}
            for _ in range(60_000):
                status = svc.proc.status(job)
                if status["bytes_done"] >= at * status["bytes_total"] > 0 or job_state(status) != "RUNNING":
                    break
                time.sleep(0.02)
            sent = status["bytes_done"]
            began = time.monotonic()
            svc.proc._call("DELETE", f"/api/distribute/image/{job}")
            status = svc.proc.wait(job, timeout=120.0)
            took = time.monotonic() - began
        held = sum(reg.session_bytes("cancel/out") for reg in sinks)
        print(f"pydlit: {described}")
        print(f"{image.total_bytes / 2**20:.0f} MiB (4 layers) to {targets} registries, cancelled with "
              f"{sent / 2**20:.0f} MiB of {status['bytes_total'] / 2**20:.0f} MiB sent: {job_state(status)} "
              f"({status['error']}) {took:.2f} s after the DELETE; the registries' upload sessions still hold "
              f"{held / 2**20:.1f} MiB")
    finally:
        regs.drop([source, *sinks])
        regs.sweep()


def tls(root: Path, reps: int, rev: str | None) -> None:
    Service.code_dir, described = snapshot_code(root, rev)
    regs = Registries(root)
    source = regs.new("source")
    image = push_image(source, "tls/img", "v1", layer_sizes=(128 * 1024 * 1024,) * 4, seed=9500)
    times: dict[str, list[float]] = {"pydlit": [], "skopeo": []}
    cpus: dict[str, list[float]] = {"pydlit": [], "skopeo": []}
    try:
        with Service(root, {}, "tls") as svc:
            def run_pydlit(target: Registry) -> tuple[float, float]:
                c0 = proc_cpu(svc.pid)
                wall, _ = svc.run_jobs([body_for(source, "tls/img", "v1", [(target, "tls/out")])])
                return wall, proc_cpu(svc.pid) - c0

            def run_skopeo(target: Registry) -> tuple[float, float]:
                run = skopeo_copy(source.host, "tls/img:v1", target.host, "tls/out:v1", f"{target.user}:{target.password}")
                return run.wall, run.cpu

            for rep in range(reps):
                tools = [("pydlit", run_pydlit), ("skopeo", run_skopeo)]
                for name, run in tools if rep % 2 == 0 else tools[::-1]:
                    target = regs.new(f"tls-{name}-{rep}", "tls_htpasswd")
                    try:
                        os.sync()
                        wall, cpu = run(target)
                    finally:
                        regs.drop([target])
                    times[name].append(wall)
                    cpus[name].append(cpu)
                    print(f"  rep {rep + 1} {name}: {wall:.2f} s, {cpu:.2f} cpu-s", flush=True)
        print(f"pydlit: {described}")
        med = {name: (statistics.median(times[name]), statistics.median(cpus[name])) for name in times}
        print(f"{image.total_bytes / 2**20:.0f} MiB (4 layers) to an https registry with Basic auth, {reps} reps, medians: "
              f"pydlit {med['pydlit'][0]:.2f} s ({med['pydlit'][1]:.2f} cpu-s), skopeo {med['skopeo'][0]:.2f} s "
              f"({med['skopeo'][1]:.2f} cpu-s): {med['pydlit'][0] / med['skopeo'][0]:.2f}x skopeo's time, "
              f"{med['pydlit'][1] / med['skopeo'][1]:.2f}x its CPU")
    finally:
        regs.drop([source])
        regs.sweep()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="probe", required=True)
    cost = sub.add_parser("registry-cost")
    cost.add_argument("--calls", type=int, default=400)
    link = sub.add_parser("long-link")
    link.add_argument("--latency-ms", type=float, default=25.0)
    link.add_argument("--jobs", type=int, default=12)
    link.add_argument("--rev", default=None, help="a git revision's pydlit/ instead of the work tree")
    one = sub.add_parser("one-registry")
    one.add_argument("--repos", type=int, default=3)
    one.add_argument("--reps", type=int, default=3)
    one.add_argument("--separate", action="store_true", help="one job per repository, submitted together")
    one.add_argument("--rev", default=None, help="a git revision's pydlit/ instead of the work tree")
    slow = sub.add_parser("slow-target")
    slow.add_argument("--targets", type=int, default=4)
    slow.add_argument("--rate-mib", type=float, default=8.0)
    slow.add_argument("--hang", action="store_true", help="the slow target answers nothing at all")
    slow.add_argument("--rev", default=None, help="a git revision's pydlit/ instead of the work tree")
    jobs = sub.add_parser("slow-jobs")
    jobs.add_argument("--jobs", type=int, default=2)
    jobs.add_argument("--rate-mib", type=float, default=8.0)
    jobs.add_argument("--hang", action="store_true", help="the slow registry answers no new request from 3 s in")
    jobs.add_argument("--slow-source", action="store_true", help="the slow registry is the jobs' source, not their target")
    jobs.add_argument("--rev", default=None, help="a git revision's pydlit/ instead of the work tree")
    stop = sub.add_parser("cancel")
    stop.add_argument("--targets", type=int, default=3)
    stop.add_argument("--at", type=float, default=0.4, help="the share of the job sent when it is cancelled")
    stop.add_argument("--rev", default=None, help="a git revision's pydlit/ instead of the work tree")
    secure = sub.add_parser("tls")
    secure.add_argument("--reps", type=int, default=3)
    secure.add_argument("--rev", default=None, help="a git revision's pydlit/ instead of the work tree")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pydlit-probe-") as tmp:
        if args.probe == "registry-cost":
            registry_cost(Path(tmp), args.calls)
        elif args.probe == "long-link":
            long_link(Path(tmp), args.latency_ms / 1000, args.jobs, args.rev)
        elif args.probe == "slow-target":
            slow_target(Path(tmp), args.targets, args.rate_mib, args.hang, args.rev)
        elif args.probe == "cancel":
            cancel(Path(tmp), args.targets, args.at, args.rev)
        elif args.probe == "tls":
            tls(Path(tmp), args.reps, args.rev)
        elif args.probe == "slow-jobs":
            slow_jobs(Path(tmp), args.jobs, args.rate_mib, args.hang, args.slow_source, args.rev)
        else:
            one_registry(Path(tmp), args.repos, args.reps, args.separate, args.rev)
    return 0


if __name__ == "__main__":
    sys.exit(main())

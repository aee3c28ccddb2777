"""Load-and-fault test of a ``--public`` app on loopback (issues 9 and 19), bounded in count and time.

    python bench/bench_public.py --data-dir ../shared/data                 # friendly, ~10 min, 2 CPU cores
    python bench/bench_public.py --phase hostile --data-dir ../shared/data  # hostile, ~4 min
    python bench/bench_public.py --phase all                                # both, one after the other

The friendly phase (``--phase friendly``, the default; bench/results/public.txt):

Starts ``app.py --public`` with SmolLM2 and a tiny random-weight model in a local folder as the
two choices, then 8 simulated visitors (``gradio_client``, each its own session) run ROUNDS rounds
mixing cached prunes, generation, cancels, model switches and bad inputs. Prints requests served,
errors by kind, readout latency (p50/p95) while a heavy job runs, resident memory after 50 sessions
opened and expired, export files left after expiry, lock-free time after every cancel, and whether
every visitor's results and "original" answers stayed its own. The hostile phase (issue 19,
``bench/public_hostile.py``; bench/results/public_hostile.txt) is visitors who try to take memory,
time or information from the others: oversized jobs, a burst of jobs, 60 idle sessions under a
state budget, inflating and URL uploads, a sentinel server path searched for in every byte they get.
Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from public_hostile import hostile, rss_mb  # noqa: E402 - after the paths it needs

SMALL = dict(nsamples=4, seqlen=128, eval_windows=2, eval_seqlen=128, calibration_file=None, eval_file=None)
HEAVY = dict(SMALL, nsamples=16, seqlen=256, eval_windows=6, eval_seqlen=512)
DECODE = dict(max_new_tokens=8, greedy=True, temperature=0.7, top_p=0.9, seed=0, chat=True)
PROMPT = "What is the capital of France?"
BUSY_RETRY_S = 300.0  # friendly: how long a visitor tries again while the model's line is full


def is_busy(err: Exception) -> bool:
    """The app's answer when the model's line is full (``ui.job_queue``): a visitor tries again."""
    return str(err).startswith("the lab is busy")


def app_pid(server) -> int:
    return server.process.pid


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data-dir", default=os.environ.get("PRUNING_LAB_DATA") or str(ROOT.parent / "shared/data")
    )
    p.add_argument("--phase", choices=["friendly", "hostile", "all"], default="friendly")
    p.add_argument("--rounds", type=int, default=3, help="friendly: rounds per visitor")
    p.add_argument("--visitors", type=int, default=8, help="friendly: simultaneous visitors")
    p.add_argument("--sessions", type=int, default=50, help="friendly: sessions opened and expired")
    p.add_argument(
        "--budget-s", type=float, default=600, help="friendly: stop starting new rounds after this"
    )
    p.add_argument(
        "--inflate-mb", type=int, default=256, help="hostile: MB of text the small parquet upload decodes to"
    )
    args = p.parse_args()
    failed = 0
    if args.phase in ("friendly", "all"):
        failed += friendly(args)
    if args.phase in ("hostile", "all"):
        failed += hostile(args.data_dir, args.inflate_mb)
    return 1 if failed else 0


def friendly(args: argparse.Namespace) -> int:
    """8 visitors x 3 rounds, then sessions opened and expired (the module docstring)."""
    os.environ["PRUNING_LAB_DATA"] = args.data_dir

    from app_server import start
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from tiny import save_tiny_chat_model

    t_start = time.monotonic()
    folder = save_tiny_chat_model(Path(tempfile.mkdtemp(prefix="bench-public-")) / "tiny-chat")
    ttl_min = 0.25  # 15 s: longer than a visitor's pause between requests on a loaded CPU
    server = start(["--public", "--models", f"smollm2-135m-instruct,{folder}", "--session-ttl", str(ttl_min)])
    print(f"app up in {time.monotonic() - t_start:.1f} s (pid {app_pid(server)})", flush=True)
    served = collections.Counter()
    errors = collections.Counter()
    busy = collections.Counter()  # "the lab is busy" answers, tried again
    lock = threading.Lock()

    def call(kind: str, fn, expect_error: bool = False):
        """``fn()`` counted by kind; "the lab is busy" (the model's line is full: a public CPU
        server queues 4 jobs, and 8 visitors prune at once) is tried again, as a visitor would."""
        deadline = time.monotonic() + BUSY_RETRY_S
        while True:
            try:
                out = fn()
            except AppError as err:
                if is_busy(err) and time.monotonic() < deadline:
                    with lock:
                        busy[kind] += 1
                    time.sleep(2.0)
                    continue
                with lock:
                    errors[f"{kind}: {str(err)[:60]}"] += 1
                    served[kind] += 1
                return err
            except Exception as err:  # noqa: BLE001 - counted as a failure of the app
                with lock:
                    errors[f"FAILED {kind}: {type(err).__name__} {str(err)[:60]}"] += 1
                return err
            with lock:
                served[kind] += 1
                if expect_error:
                    errors[f"UNEXPECTED SUCCESS {kind}"] += 1
            return out

    def in_line(submit):
        """A submitted job that has sent its first output and was not refused as "the lab is busy"
        (submitted again then), so that a cancel stops a job that runs or waits in the line."""
        deadline = time.monotonic() + BUSY_RETRY_S
        while True:
            job, started = submit(), time.monotonic()
            while job.status().code.name not in ("ITERATING", "PROGRESS", "FINISHED"):
                if time.monotonic() - started > 60:
                    break
                time.sleep(0.1)
            time.sleep(1.0)
            if not job.done() or time.monotonic() > deadline:
                return job
            try:
                job.result(timeout=1)
            except AppError as err:
                if is_busy(err):
                    with lock:
                        busy["prune (cancelled)"] += 1
                    continue
            except Exception:  # noqa: BLE001 - counted where its result is read
                pass
            return job

    visitors = [Client(server.url, verbose=False) for _ in range(args.visitors)]
    models = ["tiny-chat" if i % 4 == 3 else "smollm2-135m-instruct" for i in range(args.visitors)]
    layers = {"tiny-chat": 1, "smollm2-135m-instruct": 29}
    sparsity = [20 + 5 * i for i in range(args.visitors)]
    own: dict[int, dict] = {}
    originals: dict[int, str] = {}
    cancel_free: list[float] = []
    latencies: list[float] = []

    def setup(i: int) -> None:
        c = visitors[i]
        if models[i] != "smollm2-135m-instruct":
            call("load_model", lambda: c.predict(models[i], "", api_name="/load_model"))
        s = sparsity[i]
        out = call("prune", lambda: c.predict(api_name="/prune", **SMALL, q=s, k=s, v=s, o=s, gate=s, up=s,
                                              down=s, layer_last=layers[models[i]]))  # fmt: skip
        if not isinstance(out, Exception):
            own[i] = out[4]
        out = call("generate", lambda: c.predict(prompt=PROMPT, **DECODE, api_name="/generate"))
        if not isinstance(out, Exception):
            originals[i] = out[0]

    threads = [threading.Thread(target=setup, args=(i,)) for i in range(args.visitors)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    print(f"setup done at {time.monotonic() - t_start:.0f} s", flush=True)

    def round_for(i: int, r: int) -> None:
        c = visitors[i]
        n = layers[models[i]]
        s = sparsity[i]
        mix = (i + r) % 4
        if mix == 0:  # a cached re-prune at the visitor's own sparsity
            roles = dict(q=s, k=s, v=s, o=s, gate=s, up=s, down=s)
            out = call("prune", lambda: c.predict(api_name="/prune", **SMALL, **roles, layer_last=n))
            if not isinstance(out, Exception):
                own[i] = out[4]
        elif mix == 1:  # generation: the original answer must still be this visitor's model's
            out = call("generate", lambda: c.predict(prompt=PROMPT, **DECODE, api_name="/generate"))
            if not isinstance(out, Exception) and out[0] != originals[i]:
                errors[f"ORIGINAL CHANGED visitor {i}"] += 1
        elif mix == 2:  # a heavy job, cancelled; the queue must be free within 2 s
            job = in_line(lambda: c.submit(api_name="/prune", **HEAVY, layer_last=n))
            t0 = time.monotonic()
            call("cancel", lambda: c.predict(api_name="/cancel"))
            try:
                job.result(timeout=60)
            except AppError:
                pass
            except Exception as err:  # noqa: BLE001
                errors[f"FAILED cancelled job: {type(err).__name__}"] += 1
            with lock:
                cancel_free.append(time.monotonic() - t0)
            served["prune (cancelled)"] += 1
        else:  # bad inputs and a refused model switch
            call("bad: server folder", lambda: c.predict("/etc", "", api_name="/load_model"), True)
            call("bad: calibration", lambda: c.predict(api_name="/prune", **dict(SMALL, nsamples=10**6),
                                                         layer_last=n), True)  # fmt: skip
            call("bad: empty prompt", lambda: c.predict(prompt=" ", **DECODE, api_name="/generate"), True)

    for r in range(args.rounds):
        if time.monotonic() - t_start > args.budget_s:
            print(f"time budget reached after {r} rounds")
            break
        threads = [threading.Thread(target=round_for, args=(i, r)) for i in range(args.visitors)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        print(f"round {r + 1} done at {time.monotonic() - t_start:.0f} s", flush=True)

    # readout latency while a heavy job runs
    heavy = visitors[0].submit(api_name="/prune", **HEAVY)
    time.sleep(1.0)
    reader = visitors[1]
    while heavy.status().code.name not in ("FINISHED",) and len(latencies) < 40:
        t0 = time.monotonic()
        call("readout", lambda: reader.predict(api_name="/readout", calibration_file=None, eval_file=None))
        latencies.append(time.monotonic() - t0)
        time.sleep(0.2)
    call("prune", lambda: heavy.result(timeout=600))  # at 50 %: not visitor 0's own setting

    # every visitor's last result is its own model and its own sparsity
    mixed = 0
    for i, summary in own.items():
        if not summary or summary["model"] != models[i]:
            mixed += 1
            continue
        expected = sparsity[i] / 100
        if abs(summary["linear_sparsity"] - expected) > 0.01:
            mixed += 1

    # memory and files after sessions open and expire
    pid = app_pid(server)
    first = Client(server.url, verbose=False)
    call("prune", lambda: first.predict(api_name="/prune", **SMALL))
    call("export_recipe", lambda: first.predict(api_name="/export_recipe"))
    time.sleep(ttl_min * 60 * 2 + 2)
    rss_first = rss_mb(pid)
    curve = []  # resident memory after every 10 sessions have expired: bounded or still growing?
    for k in range(args.sessions):
        c = Client(server.url, verbose=False)
        quick = dict(SMALL, method="magnitude", eval_datasets=[], q=10 + k % 50)  # masks, no evaluation
        call("prune", lambda c=c, quick=quick: c.predict(api_name="/prune", **quick))
        if k % 10 == 0:
            call("export_recipe", lambda c=c: c.predict(api_name="/export_recipe"))
        if k % 10 == 9 or k == args.sessions - 1:
            time.sleep(ttl_min * 60 * 2 + 2)
            curve.append(rss_mb(pid))
    rss_after = curve[-1] if curve else rss_mb(pid)
    named = [line.split("exports: ", 1)[1].strip() for line in server.log.splitlines() if "exports: " in line]
    export_roots = [Path(named[-1])] if named else []
    files_left = sum(1 for r in export_roots for f in r.rglob("*") if f.is_file())

    lines = [
        f"bench_public: {args.visitors} visitors x {args.rounds} rounds + {args.sessions} sessions, "
        f"{time.monotonic() - t_start:.0f} s, CPU, loopback",
        f"requests served: {sum(served.values())} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(served.items()))})",
        "errors by kind: " + ("; ".join(f"{k} x{v}" for k, v in sorted(errors.items())) or "none"),
        "'the lab is busy' (the model's line full), tried again after 2 s: "
        + (", ".join(f"{k} {v}" for k, v in sorted(busy.items())) or "never"),
        f"readout latency while a heavy job runs: p50 {1000 * statistics.median(latencies):.0f} ms, "
        f"p95 {1000 * sorted(latencies)[max(0, int(0.95 * len(latencies)) - 1)]:.0f} ms "
        f"({len(latencies)} calls; target < 1 s)"
        if latencies
        else "readout latency: no samples",
        f"lock free after cancel: max {max(cancel_free, default=float('nan')):.2f} s over "
        f"{len(cancel_free)} cancels (target < 2 s)",
        f"resident memory: {rss_first:.0f} MB after the first session, {rss_after:.0f} MB after "
        f"{args.sessions} more opened and expired (growth {rss_after - rss_first:+.0f} MB; target < 100); "
        f"after every 10: {', '.join(f'{m:.0f}' for m in curve)} MB",
        f"export files left after expiry: {files_left} (in {len(export_roots)} export folders; target 0)",
        f"per-visitor results untouched: {len(own) - mixed}/{args.visitors} visitors had their own model and "
        f"sparsity; originals changed: {sum(v for k, v in errors.items() if k.startswith('ORIGINAL'))}",
        f"app alive at the end: {server.alive()}",
    ]
    text = "\n".join(lines)
    print(text)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "public.txt").write_text(text + "\n")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

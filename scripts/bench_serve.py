"""Throughput of `peftvlm serve` with and without request batching, through the openai client.

    python scripts/bench_serve.py runs/quickstart --requests 64 --concurrency 16

Loads the run once, then for each --max-batch-size value (default 1 and 8) serves it on a free
127.0.0.1 port and sends --requests chat completions (held-out images as data URLs) from
--concurrency client threads. Prints a markdown table: batch size, requests/s, p50 and p95
latency, the largest batch formed, and the share of answers equal to the held-out reference.
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def data_url(image) -> str:
    from peftvlm.data.batch.collate import open_image

    buffer = io.BytesIO()
    open_image(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def serve_in_thread(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def bench(predictor, batch: int, jobs: list, concurrency: int) -> dict:
    from openai import OpenAI

    from peftvlm.serving.openai_api import ServerOptions, build_app

    app = build_app(predictor, ServerOptions(max_batch_size=batch))
    server, thread, url = serve_in_thread(app)
    client = OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)

    def one(job):
        started = time.perf_counter()
        reply = client.chat.completions.create(model=predictor.name, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": job[0]}},
                                         {"type": "text", "text": predictor.default_prompt}]}])
        return time.perf_counter() - started, reply.choices[0].message.content == job[1]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - started
    stats = app.state.batcher.stats.as_dict()
    server.should_exit = True
    thread.join()
    latencies = sorted(r[0] for r in results)
    return {"batch": batch, "rps": len(jobs) / wall, "p50": statistics.median(latencies),
            "p95": latencies[int(0.95 * (len(latencies) - 1))],
            "max_batch": stats["max_batch_size"],
            "correct": sum(r[1] for r in results) / len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a generative run folder, e.g. runs/quickstart")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from peftvlm.data.batch.collate import last_answer
    from peftvlm.serving.predictor import open_predictor

    predictor = open_predictor(args.run, log=lambda *_: None)
    examples = [(data_url(r["images"][0]), last_answer(r["messages"]))
                for r in predictor.examples]
    jobs = [examples[i % len(examples)] for i in range(args.requests)]
    print(f"{args.requests} requests, {args.concurrency} concurrent clients, run {args.run}\n")
    print("| max batch size | requests/s | p50 latency s | p95 latency s | largest batch | "
          "answers right |\n|---|---|---|---|---|---|")
    for batch in args.max_batch_size:
        r = bench(predictor, batch, jobs, args.concurrency)
        print(f"| {r['batch']} | {r['rps']:.1f} | {r['p50']:.3f} | {r['p95']:.3f} | "
              f"{r['max_batch']} | {r['correct']:.2f} |")


if __name__ == "__main__":
    main()

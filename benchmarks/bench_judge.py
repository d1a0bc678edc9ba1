"""dadpo's own cost per judgment in `dadpo eval`, against a loopback judge that answers at once.

The judge is an OpenAI-compatible /v1/chat/completions server in its own process (so its CPU time
is not counted) that replies "[[A]]" without thinking. `dadpo eval` (dadpo.eval.run.evaluate, in
this process) judges --prompts prompts x 2 orders with --concurrency requests in flight: it renders
each judge prompt, sends it through the served-model client, parses the verdict and keeps every
finished judgment on disk as it completes. A second, identical run sends nothing (everything is
kept); its time is the fixed cost (reading prompts and responses, the summary, the PNG), so, after a warm-up eval in
another folder (imports, the template's compilation),

    cost per judgment = (CPU time of the first run - CPU time of the re-run) / judgments

in this process (all its threads), and the same for wall time. Target: < 2 ms of CPU per judgment
at concurrency 64 (issue 18: judging is bound by the judge, never by dadpo).

  python benchmarks/bench_judge.py                 # 2000 prompts, 4000 judgments
  python benchmarks/bench_judge.py --quick         # 100 prompts: wiring check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import machine_line  # benchmarks/ is on sys.path


def serve(port_file: str) -> None:
    """The loopback judge: every chat completion is answered at once with '[[A]]'."""
    import http.server

    body = json.dumps({"id": "x", "object": "chat.completion", "model": "loopback",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": "Fine. [[A]]"}}]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, payload: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):
            self._answer(b'{"object": "list", "data": []}')

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._answer(body)

    http.server.ThreadingHTTPServer.request_queue_size = 1024
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


def write_inputs(folder: Path, num_prompts: int) -> dict:
    def jsonl(name: str, rows: list[dict]) -> str:
        path = folder / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    words = "the quick brown fox jumps over the lazy dog " * 12  # ~100-word responses
    return {"prompts": jsonl("prompts.jsonl", [{"id": f"q{i}", "prompt": f"Question {i}: {words[:200]}?"}
                                               for i in range(num_prompts)]),
            "baseline": jsonl("baseline.jsonl", [{"id": f"q{i}", "response": f"B{i} {words}"}
                                                 for i in range(num_prompts)]),
            "model": jsonl("model.jsonl", [{"id": f"q{i}", "response": f"M{i} {words}"} for i in range(num_prompts)])}


def timed_run(cfg) -> tuple[float, float]:
    from dadpo.eval.run import evaluate

    wall, cpu = time.perf_counter(), time.process_time()
    evaluate(cfg, say=lambda line: None)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="100 prompts")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.quick:
        args.prompts = 100
    from dadpo.config import EvalConfig

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        port_file = folder / "port"
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists() or not port_file.read_text():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the loopback judge did not start")
                time.sleep(0.05)
            inputs = write_inputs(folder, args.prompts)
            url = f"http://127.0.0.1:{port_file.read_text()}/v1"

            def make(out: str) -> EvalConfig:
                return EvalConfig(prompts=inputs["prompts"], baseline=f"base={inputs['baseline']}",
                                  model=[f"model={inputs['model']}"], judge_url=url, judge_model="loopback",
                                  judge_concurrency=args.concurrency, bootstrap=100, out=str(folder / out),
                                  progress=False)

            timed_run(make("warm-up"))  # imports, the template's compilation: paid once per process
            cfg = make("eval")
            first_wall, first_cpu = timed_run(cfg)
            again_wall, again_cpu = timed_run(cfg)
        finally:
            server.kill()
            server.wait()
    judgments = 2 * args.prompts
    result = {"machine": machine_line(), "prompts": args.prompts, "judgments": judgments,
              "concurrency": args.concurrency, "first_run_wall_s": first_wall, "first_run_cpu_s": first_cpu,
              "rerun_wall_s": again_wall, "rerun_cpu_s": again_cpu,
              "cpu_ms_per_judgment": 1000 * max(first_cpu - again_cpu, 0.0) / judgments,
              "wall_ms_per_judgment": 1000 * max(first_wall - again_wall, 0.0) / judgments,
              "target_cpu_ms_per_judgment": 2.0}
    print(result["machine"])
    print(f"| judgments | concurrency | dadpo CPU ms / judgment | wall ms / judgment | first run s | re-run s |")
    print("|---|---|---|---|---|---|")
    print(f"| {judgments} | {args.concurrency} | {result['cpu_ms_per_judgment']:.3f} | "
          f"{result['wall_ms_per_judgment']:.3f} | {first_wall:.2f} | {again_wall:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

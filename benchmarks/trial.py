"""The adversarial trial of issue 17: bad inputs of every class, each run and its outcome classified. Not a test.

    python benchmarks/trial.py                       # -> benchmarks/results/trial.json and trial.md
    python benchmarks/trial.py --only='PEFT|files'   # a subset (regex over "class/case"), printed only
    PYTHONPATH=/tmp/old python benchmarks/trial.py --out=benchmarks/results/trial_before.json   # an older checkout
    python benchmarks/trial.py --before=benchmarks/results/trial_before.json    # tables: before beside now

Run it as a script, not with ``-m``: ``reparam`` and ``experiments`` are then imported from ``PYTHONPATH`` (the
checkout under trial), the catalogue from this folder (``trial_cases.py``). The runner's command-line cases run
``python -m experiments.run`` / ``experiments.compose`` in that checkout.

Every case is a small function that gives one bad input to the library or the runner. A worker process runs the
cases one after another; a case that gives no answer within its timeout (20 s unless it says otherwise) is a
hang: the worker is killed and a new one goes on with the next case. Outcomes:

  clear    an exception whose message contains every word the case names (the parameter path, the argument,
           the config key, the file) and says what to do (:data:`FIX`), not one of Python's raw lookup or
           arithmetic errors (:data:`RAW_TYPES`); for the command line, a message and a non-zero exit, no traceback;
  handled  no exception needed, and the case checked that the result is right (a symlink replaced rather than
           written through, a regulariser kept);
  raw      any other exception, a traceback from the command line, a hang or a crashed worker;
  silent   no exception: the bad input was taken and something was returned (the case says what).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import select
import subprocess
import sys
import time
import warnings
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "trial.json")
OUTCOMES = ("clear", "handled", "raw", "silent")
# what a message must say for a fix: what to do (an imperative starting a clause), or what the value must be
FIX = re.compile(r"(?:^|[.;:!?(,]\s*|\b(?:or|and|then|else)\s+)(?:use|set|fix|pass|rerun|resume|add|remove|narrow|"
                 r"drop|lower|raise|restore|delete|exclude|check|prefix|declare|give|export|recompute|clean|leave|"
                 r"replace|copy|cast|choose|rename|write|call|get|run|install|start|count|save)\b|\bmust be\b|"
                 r"\bdid you mean\b|\be\.g\.", re.I)
RAW_TYPES = ("KeyError", "AttributeError", "IndexError", "ZeroDivisionError", "NameError", "UnboundLocalError",
             "AssertionError", "RecursionError", "NotImplementedError", "StopIteration")


def classify(names: tuple, error: BaseException) -> tuple[str, str]:
    """``(outcome, why)`` of a case that raised ``error``; ``names``: the words the message must contain (a
    tuple of words: one of them)."""
    from trial_cases import Exited
    text = str(error)
    if isinstance(error, Exited) and error.traceback:
        return "raw", "the command line printed a traceback"
    if type(error).__name__ in RAW_TYPES:
        return "raw", f"a raw {type(error).__name__}"
    missing = [w for w in names if not any(a in text for a in ((w,) if isinstance(w, str) else w))]
    if missing:
        return "raw", "names no " + ", ".join(map(repr, missing))
    if not FIX.search(text):
        return "raw", "says nothing of a fix"
    return "clear", ""


def run_case(case) -> dict:
    from trial_cases import Handled
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = case.fn()
    except (Exception, SystemExit) as e:       # noqa: BLE001 -- every failure is an outcome here
        outcome, why = classify(case.names, e)
        message = f"{type(e).__name__}: {e}"
    else:
        outcome, why = ("handled", "") if isinstance(got, Handled) else ("silent", "no error")
        message = str(got) if got is not None else "returned without an error"
    return {"outcome": outcome, "why": why, "message": message[:600], "seconds": round(time.perf_counter() - t0, 2)}


def worker(start: int, only: str) -> None:
    """Runs the selected cases from index ``start`` on, one JSON line each on the original stdout (the cases'
    own prints go to stderr)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    from trial_cases import selected
    cases = selected(only)
    proto.write(json.dumps({"ready": True}) + "\n")
    for i in range(start, len(cases)):
        proto.write(json.dumps({"start": i}) + "\n")
        proto.write(json.dumps({"done": i, **run_case(cases[i])}) + "\n")


class _Protocol:
    """The worker's protocol lines, read from its stdout without blocking past a timeout."""
    def __init__(self, proc):
        self.fd, self.buf = proc.stdout.fileno(), b""

    def next(self, timeout: float):
        """The next line as a dict; ``None`` on a timeout, ``{}`` when the worker has exited."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return {}
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def trial(only: str, log) -> list[dict]:
    """Runs every selected case in worker processes; one result dict per case, in catalogue order."""
    from trial_cases import selected
    cases = selected(only)
    results: dict[int, dict] = {}

    def record(k: int, result: dict) -> int:
        results[k] = result
        print(f"  {k + 1}/{len(cases)} {cases[k].id}: {result['outcome']} ({result['seconds']:g} s)", flush=True)
        return k + 1

    i = 0
    while i < len(cases):
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", f"--start={i}",
                                 f"--only={only}"], stdout=subprocess.PIPE, stderr=log)
        lines, current, timeout = _Protocol(proc), None, 600.0        # the worker's imports first
        while i < len(cases):
            msg = lines.next(timeout)
            if msg is None or msg == {}:          # a hang, or the worker died (a crash in native code)
                proc.kill()
                proc.wait()
                if current is None:
                    raise RuntimeError(f"the trial's worker did not start (exit {proc.returncode}); see --log")
                i = record(current, {"outcome": "raw", "why": "hang" if msg is None else "worker crashed",
                                     "message": f"no result within {timeout:g} s" if msg is None else
                                     f"the process died (exit {proc.returncode})", "seconds": timeout})
                break
            if "start" in msg:
                current, timeout = msg["start"], cases[msg["start"]].timeout
            elif "done" in msg:
                i, current, timeout = record(msg.pop("done"), msg), None, 600.0
        else:
            proc.wait()
    return [{"class": c.cls, "case": c.name, "names": list(c.names), **results[k], **({"note": c.note} if c.note
                                                                                       else {})}
            for k, c in enumerate(cases)]


def counts(results: list[dict]) -> dict[str, Counter]:
    by = {}
    for r in results:
        by.setdefault(r["class"], Counter())[r["outcome"]] += 1
    return by


def table(now: list[dict], before: list[dict] | None) -> str:
    """Markdown: per class, tried and each outcome, ``before → now`` where a before run is given."""
    c_now, c_before = counts(now), counts(before or [])
    classes = list(dict.fromkeys([r["class"] for r in now] + [r["class"] for r in before or []]))
    head = "| class | tried | " + " | ".join(OUTCOMES) + " |"
    rows = [head, "|" + "---|" * (2 + len(OUTCOMES))]
    total_now, total_before = Counter(), Counter()
    for cls in classes + ["all"]:
        n = c_now.get(cls, Counter()) if cls != "all" else total_now
        b = c_before.get(cls, Counter()) if cls != "all" else total_before
        if cls != "all":
            total_now.update(n)
            total_before.update(b)
        cell = (lambda k: f"{b[k]} → {n[k]}") if before else (lambda k: str(n[k]))
        tried = (f"{sum(b.values())} → {sum(n.values())}" if before else str(sum(n.values())))
        name = f"**{cls}**" if cls == "all" else cls
        rows.append(f"| {name} | {tried} | " + " | ".join(cell(k) for k in OUTCOMES) + " |")
    return "\n".join(rows)


def _line(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "…"


def markdown(now: list[dict], before: list[dict] | None, meta: dict) -> str:
    lines = ["# The issue-17 trial: bad inputs, before and after" if before else "# The issue-17 trial", "",
             f"`python benchmarks/trial.py` ({len(now)} cases, {meta['wall_s']:.0f} s), code under trial: "
             f"{meta['code']}" + (f"; before: {meta['before_code']}" if before else "") + ".", "",
             "Outcomes (benchmarks/trial.py): **clear** an error naming the case's path / argument / key / file "
             "and a fix; **handled** no error needed and the result checked right; **raw** another error, a "
             "traceback, a hang (> the case's timeout) or a crash; **silent** the bad input taken without an error.",
             "The judge is automatic (benchmarks/trial.py: each case names the words a clear message must contain, "
             "and a fix is an imperative or a 'must be' / 'e.g.' / 'did you mean'), so read the messages in the "
             "JSON where a verdict matters. The catalogue (benchmarks/trial_cases.py) holds the parametrised cases "
             "of the issue-17 tests, rewritten against APIs both checkouts have, and cases written for the trial.",
             "", table(now, before), ""]
    bad = [r for r in now if r["outcome"] in ("raw", "silent")]
    lines += [f"## Not clear now ({len(bad)})", ""]
    lines += [f"- {r['class']} / `{r['case']}` — **{r['outcome']}** ({r['why']}): {_line(r['message'], 300)}"
              + (f" — *{r['note']}*" if r.get("note") else "") for r in bad] or ["None."]
    if before:
        was_bad = [r for r in before if r["outcome"] in ("raw", "silent")]
        lines += ["", f"<details><summary>Not clear before ({len(was_bad)}), with what happened</summary>", ""]
        lines += [f"- {r['class']} / `{r['case']}` — {r['outcome']} ({r['why']}): {_line(r['message'], 200)}"
                  for r in was_bad] + ["", "</details>"]
    lines += ["", "## Every case", "", "| class | case | " + ("before | " if before else "") + "now |",
              "|---|---|" + ("---|" if before else "") + "---|"]
    was = {(r["class"], r["case"]): r["outcome"] for r in before or []}
    for r in now:
        lines.append(f"| {r['class']} | `{r['case']}` | " + (f"{was.get((r['class'], r['case']), '-')} | "
                                                           if before else "") + f"{r['outcome']} |")
    return "\n".join(lines) + "\n"


def code_under_trial() -> str:
    import reparam
    root = os.path.dirname(os.path.dirname(os.path.abspath(reparam.__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "?"
    return f"{root} at {rev}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=OUT, help="results JSON; the markdown table beside it (.md)")
    ap.add_argument("--only", default="", help="regex over 'class/case': run those cases only, write nothing")
    ap.add_argument("--before", default=None, help="a results JSON of the same trial on older code")
    ap.add_argument("--log", default=os.devnull, help="where the workers' own output goes")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    if args.worker:
        worker(args.start, args.only)
        return
    t0 = time.perf_counter()
    with open(args.log, "a") as log:
        now = trial(args.only, log)
    meta = {"code": code_under_trial(), "wall_s": time.perf_counter() - t0}
    before, before_meta = None, {}
    if args.before:
        with open(args.before) as f:
            saved = json.load(f)
        before, before_meta = saved["results"], saved["meta"]
        meta["before_code"] = before_meta["code"]
    print(table(now, before))
    if args.only:
        for r in now:
            if r["outcome"] != "clear":
                print(f"{r['class']}/{r['case']}: {r['outcome']} ({r['why']}): {r['message'][:400]}")
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": now}, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown(now, before, meta))
    print(f"wrote {args.out} and its .md")


if __name__ == "__main__":
    main()

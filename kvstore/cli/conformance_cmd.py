"""``kvstore conformance URL``: run the conformance suite against one store and print the results."""

from __future__ import annotations

import argparse
import json
import sys

from kvstore.cli.common import EXIT_FAILED, add_store_arguments, print_table, url_and_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("conformance", help="check that a store behaves as kvstore expects (writes under a random prefix, then removes it)")
    add_store_arguments(p)
    p.add_argument("-k", "--case", metavar="ID", action="append", default=[], help="run only this case (repeatable)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    report = p.add_mutually_exclusive_group()
    report.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': stdout, no table)")
    report.add_argument("--junit", metavar="FILE", help="also write the results as JUnit XML")
    p.set_defaults(handler=cmd_conformance)


def cmd_conformance(args: argparse.Namespace) -> int:
    from kvstore.testing.conformance import ConformanceRun, iter_cases, run_cases
    from kvstore.testing.conformance.runner import FAIL, CaseResult, failed, to_json, to_junit

    cases = list(iter_cases(args.case))
    if args.list:
        print_table(("case", "checks"), [(c.id, c.doc) for c in cases])
        return 0
    url, extra = url_and_config(args)
    factory = ConformanceRun(url, extra)
    target = factory.config.url
    quiet = args.json == "-"

    def progress(result: CaseResult) -> None:  # the 64 MiB case can take a while on a slow link: show life
        print(f"  {result.case:<22} {result.outcome}", file=sys.stderr, flush=True)

    results = run_cases(cases, factory, progress=progress if sys.stderr.isatty() and not quiet else None)
    if args.json:
        text = json.dumps(to_json(target, results), indent=2)
        if quiet:
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    if args.junit:
        with open(args.junit, "w") as f:
            f.write(to_junit(target, results) + "\n")
    bad = failed(results)
    if not quiet:
        print(f"kvstore conformance: {target} ({factory.config.backend} backend)")
        print_table(("case", "result", "seconds", "detail"),
                    [(r.case, r.outcome.upper() if r.outcome == FAIL else r.outcome, f"{r.seconds:.2f}", _one_line(r.detail))
                     for r in results])
        counts = {o: sum(r.outcome == o for r in results) for o in ("pass", "fail", "skip")}
        print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
        if bad:
            print("failing cases: " + " ".join(r.case for r in bad), file=sys.stderr)
    return EXIT_FAILED if bad else 0


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"

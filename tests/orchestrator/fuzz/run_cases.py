"""Runs every case of cases.yaml through the CLIs' own `main`, in one process, and prints
the outcomes as JSON. Ray cannot be imported here and starting it raises: a case that gets past
the checks shows up as a traceback or a "work started" outcome, never as a run.

    python tests/orchestrator/fuzz/run_cases.py OUT_DIR
"""

from __future__ import annotations

import contextlib
import importlib.abc
import io
import json
import sys
import traceback
from pathlib import Path

import yaml

HERE = Path(__file__).parent


class BlockRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"the fuzz runner blocks {name}: nothing may reach Ray")
        return None


class WorkStarted(Exception):
    pass


def refuse_work(*args, **kwargs):
    raise WorkStarted("Ray was about to start")


def spec_file(case: dict, corpus: dict, out: Path) -> Path:
    from orchestrator.config import set_dotted

    if "file" in case:
        source = HERE / "files" / case["file"]
        if case["file"] == "large.yaml":  # made here: 2 MB has no place in the repository
            source = out / "large.yaml"
            source.write_text("model: {name: llama-tiny}\n" + "# padding\n" * 200_000)
        return source if source.exists() else Path(case["file"])
    data = set_dotted(corpus["base"], "run.storage_path", str(out / "runs"))
    if case.get("cli") == "sweep":
        data["search"] = corpus["search"]
    for path, value in case.get("set", {}).items():
        data = set_dotted(data, path, value)
    path = out / f"{case['id']}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def run(case: dict, corpus: dict, out: Path) -> dict:
    from orchestrator import sweep, train

    path = spec_file(case, corpus, out)
    cli = sweep if case.get("cli") == "sweep" else train
    argv = [str(path), *case.get("args", [])]
    if cli is sweep and case.get("dry_run", True):
        argv.append("--dry-run")  # a valid sweep prints its plan and stops before Ray
    stderr, stdout = io.StringIO(), io.StringIO()
    outcome = {"id": case["id"]}
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            outcome["exit"] = cli.main(argv)
    except SystemExit as exit_:
        outcome["exit"] = exit_.code
    except WorkStarted:
        outcome["exit"] = "work started"
    except BaseException:  # noqa: BLE001 (a traceback is exactly what we report)
        outcome["exit"] = "traceback"
        stderr.write(traceback.format_exc())
    outcome["stderr"] = stderr.getvalue()[-4000:]
    return outcome


def main() -> int:
    out = Path(sys.argv[1])
    sys.meta_path.insert(0, BlockRay())
    from orchestrator import sweep, train

    train.init_ray = sweep.init_ray = refuse_work  # the first step of real work: Ray
    corpus = yaml.safe_load((HERE / "cases.yaml").read_text())
    results = [run(case, corpus, out) for case in corpus["cases"] + corpus["valid"]]
    print(json.dumps({"results": results, "ray_imported": "ray" in sys.modules}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a sweep prints: one line per trial event, and none of Ray Train's per-report dumps.

Three parts:

* `TrialEvents` turns a trial's reports (the ``event`` keys `orchestrator.worker` sends)
  and its end into one line each: start, switch to low rank, restart, resume, done, early
  stop, failure. `console_callback` wraps it in a Ray Tune `Callback` for the sweep.
* `configure(verbose)` hides Ray Train's per-report log lines ("Reporting training result
  N: TrainingReport(... metrics={...})" and "Checkpoint successfully created at: ...").
  Ray Train logs them in its worker processes, whose output Ray streams to the driver, so
  the driver's own logging cannot hold them back. Before Ray starts, `configure` names
  `runtime_env_hook` in ``RAY_RUNTIME_ENV_HOOK``; `ray.init` then adds
  `quiet_ray_train` as the job's ``worker_process_setup_hook``, which every worker
  process of the job (on every node) runs at its start: it puts a filter on the two
  loggers that emit these lines. Ray Train's own logging setup in a worker
  (`logging.config.dictConfig`) resets levels and handlers but keeps a logger's filters.
* `configure(verbose)` also turns off the autoscaler's event lines that a driver on a
  cluster prints every few seconds while Tune holds trials back on purpose ("No available
  node types can fulfill cluster constraint ..."): ``RAY_SCHEDULER_EVENTS=0``, which Ray
  reads when it is imported. A value the user set is kept.

This module is imported by every Ray worker process (the setup hook): it imports nothing
but the standard library at the top.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
from pathlib import Path

# Ray Train's per-report lines, by the start of their message.
QUIET_MESSAGES = ("Reporting training result", "Checkpoint successfully created at")
RUNTIME_ENV_HOOK_ENV = "RAY_RUNTIME_ENV_HOOK"  # ray._private.ray_constants.RAY_RUNTIME_ENV_HOOK
CHAINED_HOOK_ENV = "RELORA_CHAINED_RUNTIME_ENV_HOOK"  # a hook the user had set, called first
RUNTIME_ENV_HOOK = "orchestrator.console.runtime_env_hook"
SETUP_HOOK = "orchestrator.console.quiet_ray_train"
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"  # where Ray passes a setup hook to the workers
AUTOSCALER_EVENTS_ENV = "RAY_SCHEDULER_EVENTS"  # ray._private.ray_constants.AUTOSCALER_EVENTS
_set_autoscaler_events = False  # whether this process's RAY_SCHEDULER_EVENTS=0 is ours


# --- quiet Ray Train ----------------------------------------------------------------------


class DropReportDumps(logging.Filter):
    """Drops Ray Train's per-report log records; lets every other record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(QUIET_MESSAGES))


def ray_train_loggers() -> list[logging.Logger]:
    """The loggers that emit the per-report lines, without importing Ray Train.

    `ray/train/v2/_internal/execution/context.py` logs "Reporting training result" through
    ``logging.getLogger(__file__)`` (a logger named by its path, outside ``ray.train``, so
    Ray Train's `LoggingConfig` does not reach it); its `storage.py` logs "Checkpoint
    successfully created" through ``ray.train.v2._internal.execution.storage``."""
    import ray  # already imported in any Ray process

    context_py = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    return [logging.getLogger(context_py), logging.getLogger("ray.train.v2._internal.execution.storage")]


def quiet_ray_train() -> None:
    """The worker-process setup hook: filter the per-report lines out in this process.

    It never raises: Ray ends a worker whose setup hook fails."""
    try:
        for logger in ray_train_loggers():
            if not any(isinstance(f, DropReportDumps) for f in logger.filters):
                logger.addFilter(DropReportDumps())
    except Exception:  # noqa: BLE001 - a noisy worker beats a dead one
        pass


def loud_ray_train() -> None:
    """Undo `quiet_ray_train` in this process."""
    for logger in ray_train_loggers():
        for f in [f for f in logger.filters if isinstance(f, DropReportDumps)]:
            logger.removeFilter(f)


def runtime_env_hook(runtime_env: dict | None) -> dict | None:
    """`ray.init`'s runtime-env hook: the job's workers run `quiet_ray_train` at their start.

    A hook the user had in ``RAY_RUNTIME_ENV_HOOK`` runs first; a setup hook of the user's
    own is kept (Ray takes one), and Ray Train's dumps then show."""
    chained = os.environ.get(CHAINED_HOOK_ENV)
    if chained:
        module, _, name = chained.rpartition(".")
        runtime_env = getattr(importlib.import_module(module), name)(runtime_env)
    env_vars = (runtime_env or {}).get("env_vars") or {}
    if runtime_env and (runtime_env.get("worker_process_setup_hook") or SETUP_HOOK_ENV in env_vars):
        return runtime_env  # a hook of the job's own (set directly, or by a Ray job's supervisor)
    return {**(runtime_env or {}), "worker_process_setup_hook": SETUP_HOOK}


def configure(verbose: bool) -> None:
    """Call before Ray starts: unless ``verbose``, Ray Train's per-report lines stay hidden
    in every process of the Ray job, and so do the autoscaler's event lines (see the module's
    docstring); with it, they show."""
    global _set_autoscaler_events
    current = os.environ.get(RUNTIME_ENV_HOOK_ENV)
    if verbose:
        if _set_autoscaler_events:
            os.environ.pop(AUTOSCALER_EVENTS_ENV, None)
            _set_autoscaler_events = False
        loud_ray_train()
        if current == RUNTIME_ENV_HOOK:  # set by an earlier call in this process
            chained = os.environ.pop(CHAINED_HOOK_ENV, None)
            if chained:
                os.environ[RUNTIME_ENV_HOOK_ENV] = chained
            else:
                del os.environ[RUNTIME_ENV_HOOK_ENV]
        return
    if AUTOSCALER_EVENTS_ENV not in os.environ:
        os.environ[AUTOSCALER_EVENTS_ENV] = "0"
        _set_autoscaler_events = True
    quiet_ray_train()  # this process too
    if current != RUNTIME_ENV_HOOK:
        if current:
            os.environ[CHAINED_HOOK_ENV] = current
        os.environ[RUNTIME_ENV_HOOK_ENV] = RUNTIME_ENV_HOOK


# --- one line per trial event --------------------------------------------------------------


def _num(value, spec: str = ".4g") -> str:
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return "?"


class TrialEvents:
    """Formats a trial's events as single lines; knows nothing of Ray (tested on plain dicts).

    ``report`` takes each result a trial reports, ``complete`` and ``error`` its end; each
    returns the line to print, or None. ``metric``/``mode`` name the ASHA metric, for the
    best value an early-stopped trial reached."""

    def __init__(self, metric: str = "val_ppl", mode: str = "min") -> None:
        self.metric, self.mode = metric, mode
        self.last: dict[str, dict] = {}  # trial id -> its last result
        self.best: dict[str, float] = {}  # trial id -> its best value of the metric so far
        self.held: dict[str, str] = {}  # trial id -> its start line, until its switch to low rank

    def report(self, trial_id: str, result: dict) -> str | None:
        """The line for this report, if it is an event. A start from the shared warm start is
        held back for the switch to low rank that follows at once: one line says both."""
        held = self.held.pop(trial_id, None)
        line = self._report(trial_id, result)
        if result.get("event") == "start" and result.get("from_warm_start"):
            self.held[trial_id] = line
            return held
        if held and result.get("event") == "switch":
            params = result.get("trainable_params")
            trainable = f": {int(params):,} trainable parameters" if isinstance(params, (int, float)) else ""
            return f"{held}; switched to low rank{trainable}"
        return "\n".join(filter(None, (held, line))) or None

    def _report(self, trial_id: str, result: dict) -> str | None:
        self.last[trial_id] = result
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            best = self.best.get(trial_id)
            better = best is None or (value < best if self.mode == "min" else value > best)
            self.best[trial_id] = value if better else best
        event = result.get("event")
        head = f"trial {trial_id}:"
        if event == "start":
            where = "from the shared warm start" if result.get("from_warm_start") else "from scratch"
            return f"{head} started at step {result.get('step', 0)} {where}{self._metric_of(result)}"
        if event == "switch":
            params = result.get("trainable_params")
            trainable = f", {int(params):,} trainable parameters" if isinstance(params, (int, float)) else ""
            return f"{head} switched to low rank at step {result.get('at_step', result.get('step'))}{trainable}"
        if event == "restart":
            return self._restart(head, result)
        if event == "resume":
            return f"{head} resumed from its checkpoint at step {result.get('from_step', result.get('step'))}"
        if event == "done":
            ppl = result.get("final_val_ppl")
            final = f", final val_ppl {_num(ppl)}" if ppl is not None else ""
            return f"{head} done at step {result.get('step')}{final}"
        if result.get("stop_reason"):
            return f"{head} stopped: {result['stop_reason']}"
        return None

    def _metric_of(self, result: dict) -> str:
        return f", {self.metric} {_num(result[self.metric])}" if self.metric in result else ""

    def _restart(self, head: str, result: dict) -> str:
        parts = [f"merged {result.get('merged_layers', '?')} layers"]
        if "reset_fraction" in result:
            parts.append(f"reset {_num(result['reset_fraction'], '.0%')} of the adapters' optimizer state")
        if "update_rank_max" in result:
            mean = f", mean {_num(result['update_rank_mean'], '.1f')}" if "update_rank_mean" in result else ""
            parts.append(f"update rank max {result['update_rank_max']}{mean}")
        if result.get("weights_in_sync") is False:
            parts.append("WEIGHTS OUT OF SYNC across ranks")
        at = result.get("at_step", result.get("step"))
        return f"{head} restart {result.get('restarts', '?')} at step {at}: " + ", ".join(parts)

    def complete(self, trial_id: str) -> str | None:
        """A trial ended without error: done (its line came with the report), stopped on a
        non-finite loss (likewise), or stopped early by ASHA (said here)."""
        held = self.held.pop(trial_id, None)
        last = self.last.get(trial_id, {})
        if last.get("event") == "done" or last.get("stop_reason"):
            return held
        best = self.best.get(trial_id)
        value = f" (best {self.metric} {_num(best)})" if best is not None else ""
        stopped = f"trial {trial_id}: stopped early by ASHA at step {last.get('step', '?')}{value}"
        return f"{held}\n{stopped}" if held else stopped

    def error(self, trial_id: str, message: str | None, *, retrying: bool) -> str:
        """A trial's failure, on one line: the last line of its error (the exception)."""
        lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
        cause = lines[-1] if lines else "no error message"
        if len(cause) > 300:
            cause = cause[:297] + "..."
        step = self.last.get(trial_id, {}).get("step")
        at = f" after step {step}" if step is not None else ""
        then = "retrying from its last checkpoint" if retrying else "no retries left"
        failed = f"trial {trial_id}: failed{at} ({cause}); {then}"
        held = self.held.pop(trial_id, None)
        return f"{held}\n{failed}" if held else failed


def _error_message(trial) -> str | None:
    """The trial's error text: Tune's local error file (written before the callbacks run), or
    the copy in the experiment's storage."""
    for read in (lambda: Path(trial.error_file).read_text(), trial.get_error):
        try:
            text = read()
        except Exception:  # noqa: BLE001 - the line says "no error message" instead
            continue
        if text:
            return str(text)
    return None


# --- the terminal and the log ----------------------------------------------------------------


class Terminal:
    """Where the product's own lines go while everything else goes to the sweep's log.

    `capture` points this process's file descriptors 1 and 2 at the log file, so that all a
    user would otherwise have to read past lands there: Ray's streamed worker output, its C++
    core's lines, Tune's status tables, Ray Data's progress frames, library warnings and
    progress bars, of this process and of every process it starts. `say` writes to the
    terminal the process had, and to the log. `release` puts the descriptors back."""

    def __init__(self) -> None:
        self.out, self.err = sys.stdout, sys.stderr  # until `capture`: the process's own streams
        self.log_path: str | None = None
        self._saved: tuple[int, int] | None = None
        self._owned: list = []
        self._live = ""  # the progress line currently drawn on a TTY

    def capture(self, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = os.dup(1), os.dup(2)
        # A stream a caller put in place of the process's (contextlib.redirect_stdout) keeps
        # getting the lines; the process's own terminal is reopened from its saved descriptor.
        self.out = sys.stdout if sys.stdout is not sys.__stdout__ else self._open(saved[0])
        self.err = sys.stderr if sys.stderr is not sys.__stderr__ else self._open(saved[1])
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        self._saved, self.log_path = saved, str(log_path)

    def _open(self, fd: int):
        stream = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
        self._owned.append(stream)
        return stream

    def release(self) -> None:
        if self._saved is None:
            return
        self.clear_live()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, saved in zip((1, 2), self._saved, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        for stream in self._owned:
            stream.close()
        self.out, self.err, self._saved, self._owned, self.log_path = sys.stdout, sys.stderr, None, [], None

    @property
    def captured(self) -> bool:
        return self._saved is not None

    def say(self, line: str, *, error: bool = False) -> None:
        """One line to the terminal (stderr for an error), and to the log when captured."""
        self.clear_live()
        print(line, file=self.err if error else self.out, flush=True)
        if self.captured:  # the log is fd 1 now (sys.stdout may be a caller's stream: not twice there)
            sys.stdout.flush()
            os.write(1, (line + "\n").encode("utf-8", "replace"))
        self.draw_live(self._live)

    def is_tty(self) -> bool:
        return bool(getattr(self.out, "isatty", lambda: False)())

    def draw_live(self, line: str) -> None:
        """A line redrawn in place (a TTY only): the sweep's progress bar."""
        self._live = line
        if line and self.is_tty():
            self.out.write("\r\x1b[K" + line)
            self.out.flush()

    def clear_live(self) -> None:
        if self._live and self.is_tty():
            self.out.write("\r\x1b[K")
            self.out.flush()


terminal = Terminal()


def say(line: str, *, error: bool = False) -> None:
    """A line of the product's own: to the terminal, and to the log when there is one."""
    terminal.say(line, error=error)


class WarningsToTerminal(logging.Handler):
    """The product's own warnings and errors (an MLflow call dropped, a checkpoint not logged)
    reach the terminal too, one line each: a real problem is never only in the log."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if terminal.captured:
            first = (record.getMessage().strip().splitlines() or [""])[0][:300]
            terminal.say(f"{record.levelname.lower()}: {first}", error=record.levelno >= logging.ERROR)


class Progress:
    """The sweep's progress: trials done and running, and the best value so far. On a TTY a
    bar redrawn in place at every report; elsewhere (a log file, CI) the standing is added to
    the line that says a trial ended."""

    def __init__(self, total: int, metric: str, mode: str, width: int = 24) -> None:
        self.total, self.metric, self.mode, self.width = total, metric, mode, width
        self.running: set[str] = set()
        self.done: set[str] = set()
        self.best: tuple[float, str] | None = None

    def standing(self) -> str:
        best = f", best {self.metric} {_num(self.best[0])} ({self.best[1]})" if self.best else ""
        return f"{len(self.done)}/{self.total} trials done, {len(self.running)} running{best}"

    def line(self) -> str:
        filled = round(self.width * len(self.done) / self.total) if self.total else 0
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {self.standing()}"

    def _count(self, trials: list) -> None:
        """Trials done and running, read from Tune's trials (whole after a resume) and the ends seen."""
        self.done |= {t.trial_id for t in trials if getattr(t, "status", None) in ("TERMINATED", "ERROR")}
        self.running = {t.trial_id for t in trials if getattr(t, "status", None) == "RUNNING"} - self.done
        self.total = max(self.total, len(trials))

    def started(self, trials: list, trial_id: str) -> None:
        self.done.discard(trial_id)
        self._count(trials)
        self.running.add(trial_id)
        terminal.draw_live(self.line())

    def result(self, trials: list, trial_id: str, value) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            if self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0]):
                self.best = (float(value), trial_id)
        if terminal.is_tty():
            self._count(trials)
            terminal.draw_live(self.line())

    def ended(self, trials: list, trial_id: str) -> str:
        """Count the trial's end. On a TTY the bar is redrawn and "" returned; elsewhere the
        standing, for the end's line: " [2/4 trials done, 1 running, best val_ppl 717.3 (t2)]"."""
        self.done.add(trial_id)
        self._count(trials)
        if terminal.is_tty():
            terminal.draw_live(self.line())
            return ""
        return f" [{self.standing()}]"


def console_callback(metric: str, mode: str, printer=say, total: int | None = None):
    """A Ray Tune `Callback` printing `TrialEvents`' lines (Tune runs callbacks on the driver),
    and, given the sweep's ``total`` number of trials, its `Progress`.

    The class is made here so that importing this module (every Ray worker does, for the
    setup hook) does not import Ray Tune; Tune pickles it with its state by value."""
    from ray.tune import Callback

    class ConsoleCallback(Callback):
        def __init__(self) -> None:
            self.events = TrialEvents(metric, mode)
            self.progress = Progress(total, metric, mode) if total else None

        def _say(self, line: str | None, trials=None, ended: str | None = None) -> None:
            """``line``, with the sweep's standing when it says that trial ``ended``."""
            if self.progress and ended and ended not in self.progress.done:
                standing = self.progress.ended(trials, ended)
                line = line + standing if line else None
            if line:
                printer(line)

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            if self.progress:
                self.progress.started(trials, trial.trial_id)

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if self.progress:
                self.progress.result(trials, trial.trial_id, result.get(metric))
            last = result.get("event") == "done" or bool(result.get("stop_reason"))
            self._say(self.events.report(trial.trial_id, result), trials, trial.trial_id if last else None)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._say(self.events.complete(trial.trial_id), trials, trial.trial_id)

        def on_trial_recover(self, iteration, trials, trial, **info) -> None:
            self._say(self.events.error(trial.trial_id, _error_message(trial), retrying=True))

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            line = self.events.error(trial.trial_id, _error_message(trial), retrying=False)
            self._say(line, trials, trial.trial_id)

    return ConsoleCallback()

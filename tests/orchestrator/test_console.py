"""The sweep's terminal: one line per trial event, and Ray Train's per-report dumps hidden."""

from __future__ import annotations

import logging
import logging.config
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from orchestrator import console
from orchestrator.console import TrialEvents

RESTART = {
    "step": 40,
    "event": "restart",
    "at_step": 40,
    "restarts": 1,
    "merged_layers": 14,
    "reset_fraction": 0.99,
    "merge_lost_share": 1e-7,
    "weights_in_sync": True,
    "update_rank_max": 4,
    "update_rank_mean": 3.5,
    "update_rank/model.layers.0.self_attn.q_proj": 4,  # every layer's rank: none of it on the line
    "train_loss": 6.1,
}


def test_restart_is_one_line_with_its_numbers():
    line = TrialEvents().report("a_00000", RESTART)
    assert line == (
        "trial a_00000: restart 1 at step 40: merged 14 layers, "
        "reset 99% of the adapters' optimizer state, update rank max 4, mean 3.5"
    )
    assert "\n" not in line and "q_proj" not in line


def test_restart_flags_ranks_out_of_sync():
    line = TrialEvents().report("a_00000", {**RESTART, "weights_in_sync": False})
    assert line.endswith("WEIGHTS OUT OF SYNC across ranks")


def test_plain_reports_print_nothing():
    events = TrialEvents()
    assert events.report("a_00000", {"step": 5, "train_loss": 7.0, "lr": 1e-3}) is None
    assert events.report("a_00000", {"step": 10, "train_loss": 6.9, "val_ppl": 900.0}) is None


def test_start_switch_resume_done_lines():
    events = TrialEvents()
    # From the shared warm start, a trial switches to low rank at once: one line says both.
    assert events.report("w", {"step": 20, "event": "start", "from_warm_start": True, "val_ppl": 1234.5}) is None
    assert (
        events.report("w", {"step": 21, "event": "switch", "at_step": 20, "trainable_params": 123456})
        == "trial w: started at step 20 from the shared warm start, val_ppl 1234; "
        "switched to low rank: 123,456 trainable parameters"
    )
    # Anything else after a held start says the start first.
    assert events.report("v", {"step": 20, "event": "start", "from_warm_start": True}) is None
    started = "trial v: started at step 20 from the shared warm start"
    assert events.report("v", {"step": 21, "train_loss": 5.0}) == started
    assert events.report("u", {"step": 20, "event": "start", "from_warm_start": True}) is None
    assert events.complete("u") == (
        "trial u: started at step 20 from the shared warm start\ntrial u: stopped early by ASHA at step 20"
    )
    assert (
        events.report("t", {"step": 0, "event": "start", "val_ppl": 4148.3})
        == "trial t: started at step 0 from scratch, val_ppl 4148"
    )
    assert (
        events.report("t", {"step": 21, "event": "switch", "at_step": 20, "trainable_params": 123456})
        == "trial t: switched to low rank at step 20, 123,456 trainable parameters"
    )
    assert (
        events.report("t", {"step": 40, "event": "resume", "from_step": 40})
        == "trial t: resumed from its checkpoint at step 40"
    )
    assert (
        events.report("t", {"step": 80, "event": "done", "final_val_ppl": 717.2552})
        == "trial t: done at step 80, final val_ppl 717.3"
    )
    assert events.complete("t") is None  # its end was said with the "done" report


def test_early_stop_is_one_line_with_the_best_value():
    events, lines = TrialEvents("val_ppl", "min"), []
    for result in (
        {"step": 0, "event": "start", "val_ppl": 4000.0},
        {"step": 30, "val_ppl": 2500.0},
        {"step": 40, "val_ppl": 2687.6, "settled_step": 40},
    ):
        lines.append(events.report("b", result))
    lines.append(events.complete("b"))
    printed = [line for line in lines if line]
    assert printed[1:] == ["trial b: stopped early by ASHA at step 40 (best val_ppl 2500)"]


def test_best_follows_the_mode():
    events = TrialEvents("accuracy", "max")
    for value in (0.1, 0.7, 0.4):
        events.report("c", {"step": 1, "accuracy": value})
    assert events.complete("c") == "trial c: stopped early by ASHA at step 1 (best accuracy 0.7)"


def test_non_finite_stop_is_said_once():
    events = TrialEvents()
    reason = "non-finite training loss (nan) at step 33"
    assert events.report("d", {"step": 33, "train_loss": float("nan"), "stop_reason": reason}) == (
        f"trial d: stopped: {reason}"
    )
    assert events.complete("d") is None  # not an ASHA stop


def test_failure_is_one_line_with_the_exception():
    events = TrialEvents()
    events.report("e", {"step": 25, "train_loss": 7.0})
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nRuntimeError: worker died\n'
    assert events.error("e", trace, retrying=True) == (
        "trial e: failed after step 25 (RuntimeError: worker died); retrying from its last checkpoint"
    )
    assert events.error("f", None, retrying=False) == "trial f: failed (no error message); no retries left"
    assert len(events.error("g", "x" * 1000, retrying=False)) < 400


def test_callback_is_a_tune_callback_and_survives_pickling():
    from ray import cloudpickle
    from ray.tune import Callback

    lines: list[str] = []
    callback = console.console_callback("val_ppl", "min", printer=lines.append)
    assert isinstance(callback, Callback)
    trial = SimpleNamespace(trial_id="a_00001", get_error=lambda: "Traceback\nValueError: bad")
    callback.on_trial_result(iteration=1, trials=[trial], trial=trial, result=RESTART)
    callback.on_trial_result(iteration=2, trials=[trial], trial=trial, result={"step": 45, "val_ppl": 99.0})
    callback.on_trial_recover(iteration=3, trials=[trial], trial=trial)
    callback.on_trial_result(iteration=4, trials=[trial], trial=trial, result={"event": "resume", "from_step": 40})
    callback.on_trial_complete(iteration=5, trials=[trial], trial=trial)
    assert lines == [
        "trial a_00001: restart 1 at step 40: merged 14 layers, reset 99% of the adapters' optimizer state, "
        "update rank max 4, mean 3.5",
        "trial a_00001: failed after step 45 (ValueError: bad); retrying from its last checkpoint",
        "trial a_00001: resumed from its checkpoint at step 40",
        "trial a_00001: stopped early by ASHA at step ? (best val_ppl 99)",
    ]
    # Tune pickles its RunConfig, callbacks included, into the experiment's tuner.pkl.
    copy = cloudpickle.loads(cloudpickle.dumps(console.console_callback("val_ppl", "min")))
    assert copy.events.metric == "val_ppl"


# --- quieting Ray Train ---------------------------------------------------------------------


def test_the_filtered_loggers_are_the_ones_ray_train_logs_through():
    """The dumps' loggers, found without importing Ray Train, are Ray Train's own."""
    from ray.train.v2._internal.execution import context, storage

    loggers = console.ray_train_loggers()
    assert context.logger in loggers  # "Reporting training result ..."
    assert storage.logger in loggers  # "Checkpoint successfully created at ..."


def test_the_env_var_names_are_rays():
    from ray._private import ray_constants

    assert console.RUNTIME_ENV_HOOK_ENV == ray_constants.RAY_RUNTIME_ENV_HOOK
    assert console.SETUP_HOOK_ENV == ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR


def test_filter_drops_the_dumps_only_and_survives_ray_trains_logging_setup():
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    context_logger, storage_logger = console.ray_train_loggers()
    root, train = logging.getLogger(), logging.getLogger("ray.train")
    saved = [(logger, logger.level, list(logger.handlers), logger.propagate) for logger in (root, train)]
    console.quiet_ray_train()
    console.quiet_ray_train()  # idempotent
    try:
        assert sum(isinstance(f, console.DropReportDumps) for f in context_logger.filters) == 1
        # What Ray Train's LoggingManager does in a worker: configure `ray.train` and the root
        # logger with dictConfig, after the setup hook ran (resetting child loggers' levels).
        logging.config.dictConfig(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "handlers": {"keep": {"()": Keep}},
                "loggers": {"ray.train": {"level": "DEBUG", "handlers": ["keep"], "propagate": False}},
                "root": {"level": "INFO", "handlers": ["keep"]},
            }
        )
        context_logger.info("Reporting training result 3: TrainingReport(metrics={'step': 5})")
        storage_logger.info("Checkpoint successfully created at: Checkpoint(path=/x)")
        context_logger.warning("Checkpoint upload has been running for 60s")
        storage_logger.info("something else")
        assert records == ["Checkpoint upload has been running for 60s", "something else"]
        console.loud_ray_train()
        context_logger.info("Reporting training result 4: ...")
        assert records[-1] == "Reporting training result 4: ..."
    finally:
        console.loud_ray_train()
        for logger, level, handlers, propagate in saved:
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.propagate = propagate


def test_runtime_env_hook_adds_the_setup_hook_and_keeps_the_users(monkeypatch):
    monkeypatch.delenv(console.CHAINED_HOOK_ENV, raising=False)
    assert console.runtime_env_hook(None) == {"worker_process_setup_hook": console.SETUP_HOOK}
    env = {"env_vars": {"A": "1"}}
    assert console.runtime_env_hook(env) == {"env_vars": {"A": "1"}, "worker_process_setup_hook": console.SETUP_HOOK}
    assert env == {"env_vars": {"A": "1"}}  # not changed in place
    theirs = {"worker_process_setup_hook": "their.hook"}
    assert console.runtime_env_hook(theirs) == theirs
    exported = {"env_vars": {console.SETUP_HOOK_ENV: "their.hook"}}  # as a Ray job's supervisor passes it on
    assert console.runtime_env_hook(exported) == exported
    # A user's own RAY_RUNTIME_ENV_HOOK still runs, first.
    monkeypatch.setenv(console.CHAINED_HOOK_ENV, "json.loads")
    assert console.runtime_env_hook('{"env_vars": {"B": "2"}}') == {
        "env_vars": {"B": "2"},
        "worker_process_setup_hook": console.SETUP_HOOK,
    }


def test_configure_sets_and_undoes_the_hook(monkeypatch):
    monkeypatch.setenv(console.RUNTIME_ENV_HOOK_ENV, "their.hook")
    monkeypatch.delenv(console.CHAINED_HOOK_ENV, raising=False)
    try:
        console.configure(verbose=False)
        assert os.environ[console.RUNTIME_ENV_HOOK_ENV] == console.RUNTIME_ENV_HOOK
        assert os.environ[console.CHAINED_HOOK_ENV] == "their.hook"
        console.configure(verbose=False)  # twice: the user's hook is not lost
        assert os.environ[console.CHAINED_HOOK_ENV] == "their.hook"
        console.configure(verbose=True)
        assert os.environ[console.RUNTIME_ENV_HOOK_ENV] == "their.hook"
        assert console.CHAINED_HOOK_ENV not in os.environ
        monkeypatch.delenv(console.RUNTIME_ENV_HOOK_ENV)
        console.configure(verbose=True)  # nothing to undo
        assert console.RUNTIME_ENV_HOOK_ENV not in os.environ
    finally:
        console.loud_ray_train()


def test_configure_turns_the_autoscaler_events_off_unless_verbose_or_set_by_the_user(monkeypatch):
    monkeypatch.delenv(console.AUTOSCALER_EVENTS_ENV, raising=False)
    try:
        console.configure(verbose=False)
        assert os.environ[console.AUTOSCALER_EVENTS_ENV] == "0"
        console.configure(verbose=True)
        assert console.AUTOSCALER_EVENTS_ENV not in os.environ
        monkeypatch.setenv(console.AUTOSCALER_EVENTS_ENV, "1")  # the user's choice stays
        console.configure(verbose=False)
        assert os.environ[console.AUTOSCALER_EVENTS_ENV] == "1"
        console.configure(verbose=True)
        assert os.environ[console.AUTOSCALER_EVENTS_ENV] == "1"
    finally:
        console.loud_ray_train()


def test_a_driver_that_configured_before_importing_ray_prints_no_autoscaler_events():
    """What a sweep driver on a cluster does (a subprocess: Ray reads the switch at import):
    Ray's switch for the autoscaler's event lines is off, and the driver's filter of those
    lines lets none through; without `configure` the switch is on."""
    script = textwrap.dedent(
        """
        import sys
        if sys.argv[1] == "configured":
            from orchestrator.console import configure
            configure(verbose=False)
        from ray._private import ray_constants
        from ray._private.worker import filter_autoscaler_events
        print(bool(ray_constants.AUTOSCALER_EVENTS))
        if not ray_constants.AUTOSCALER_EVENTS:
            line = ":event_summary:No available node types can fulfill cluster constraint"
            print(list(filter_autoscaler_events([line])))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != console.AUTOSCALER_EVENTS_ENV}
    printed = {}
    for mode in ("configured", "plain"):
        done = subprocess.run(
            [sys.executable, "-c", script, mode], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        printed[mode] = done.stdout.split()
    assert printed == {"configured": ["False", "[]"], "plain": ["True"]}


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_a_real_ray_train_run_hides_its_report_dumps_unless_verbose(tmp_path, verbose):
    """A real TorchTrainer on a fresh local Ray (a subprocess: ray.init reads the hook): the
    per-report lines are absent from the driver's output and from every log file Ray wrote,
    or, with verbose, present in both."""
    script = textwrap.dedent(
        """
        import pathlib, sys, tempfile
        import ray
        from orchestrator.console import configure

        configure(verbose=sys.argv[1] == "verbose")
        ray.init(num_cpus=2, include_dashboard=False)
        from ray.train import Checkpoint, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        def loop(config):
            import ray.train
            for step in range(3):
                with tempfile.TemporaryDirectory() as tmp:
                    pathlib.Path(tmp, "x").write_text("x")
                    ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(tmp))

        run = RunConfig(name="probe", storage_path=sys.argv[2])
        TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1), run_config=run).fit()
        logs = pathlib.Path(ray._private.worker._global_node.get_logs_dir_path())
        text = "".join(f.read_text(errors="replace") for f in logs.rglob("*") if f.is_file())
        print("IN LOG FILES:", text.count("Reporting training result"), text.count("Checkpoint successfully created"))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in (console.RUNTIME_ENV_HOOK_ENV, console.CHAINED_HOOK_ENV)}
    done = subprocess.run(
        [sys.executable, "-c", script, "verbose" if verbose else "quiet", str(tmp_path / "runs")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    reports, checkpoints = map(int, output.split("IN LOG FILES:")[1].split()[:2])
    if verbose:
        assert reports >= 3 and checkpoints >= 3, output[-3000:]
    else:
        assert (reports, checkpoints) == (0, 0), output[-3000:]
        assert "Reporting training result" not in output, output[-3000:]
        assert "Checkpoint successfully created" not in output, output[-3000:]


def test_a_real_tune_run_prints_one_line_per_restart_early_stop_and_failure(tmp_path):
    """Real Ray Tune, real ASHA: function trials that report like the workers do."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    def trainable(config):
        if config["kind"] == "fail":
            raise RuntimeError("boom in the trial")
        ppl = {"good": 10.0, "bad": 100.0}[config["kind"]]
        for step in range(1, 5):
            result = {"step": step, "val_ppl": ppl}
            if step == 3:
                result.update(event="restart", at_step=3, restarts=1, merged_layers=2, reset_fraction=0.5)
            if step == 4:
                result.update(event="done", final_val_ppl=ppl)
            tune.report(result)

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    lines: list[str] = []
    try:
        tune.Tuner(
            trainable,
            param_space={"kind": tune.grid_search(["good", "bad", "fail"])},
            tune_config=tune.TuneConfig(
                scheduler=ASHAScheduler(
                    metric="val_ppl", mode="min", time_attr="step", grace_period=2, reduction_factor=2, max_t=4
                ),
                max_concurrent_trials=1,  # "good" reaches the rung first: "bad" is the one ASHA stops
            ),
            run_config=tune.RunConfig(
                name="console",
                storage_path=str(tmp_path),
                callbacks=[console.console_callback("val_ppl", "min", printer=lines.append)],
                verbose=0,
            ),
        ).fit()
    finally:
        if started:
            ray.shutdown()
    by_kind = {}
    for line in lines:
        by_kind.setdefault(line.split(":")[0], []).append(line)
    assert len(by_kind) == 3, lines
    good, bad, fail = by_kind.values()  # the grid's order, one trial at a time
    assert [line.split(": ", 1)[1] for line in good] == [
        "restart 1 at step 3: merged 2 layers, reset 50% of the adapters' optimizer state",
        "done at step 4, final val_ppl 10",
    ]
    assert [line.split(": ", 1)[1] for line in bad] == ["stopped early by ASHA at step 2 (best val_ppl 100)"]
    assert len(fail) == 1 and "RuntimeError: boom in the trial" in fail[0] and fail[0].endswith("no retries left")


def test_a_failing_trial_s_cause_reaches_the_terminal_and_the_rest_goes_to_the_log(tmp_path):
    """A real Ray Tune run in a process whose output is captured as a sweep's is: the terminal
    gets the trial's one-line failure, the progress line and where the log is; the worker's
    prints, Tune's tables and the traceback go to the log only."""
    script = textwrap.dedent(
        """
        import pathlib, sys
        from orchestrator import console

        console.terminal.capture(pathlib.Path(sys.argv[1]))
        import ray
        from ray import tune

        ray.init(num_cpus=2, include_dashboard=False)
        import os
        os.write(2, b"NOISE from a C++ core\\n")  # what Ray's core writes to fd 2 itself
        print("NOISE from a library", flush=True)

        def trainable(config):
            print("NOISE from the trial's process")
            raise ValueError("the schedule has no steps")

        tune.Tuner(
            trainable,
            param_space={"x": tune.grid_search([1])},
            run_config=tune.RunConfig(
                name="fails", storage_path=sys.argv[2], verbose=1,
                callbacks=[console.console_callback("val_ppl", "min", total=1)],
            ),
        ).fit()
        ray.shutdown()
        console.say("full log: " + sys.argv[1])
        console.terminal.release()
        print("released")
        """
    )
    log = tmp_path / "logs" / "sweep.log"
    env = {k: v for k, v in os.environ.items() if k not in (console.RUNTIME_ENV_HOOK_ENV, console.CHAINED_HOOK_ENV)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(log), str(tmp_path / "runs")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    terminal = done.stdout.splitlines() + done.stderr.splitlines()
    assert done.returncode == 0, log.read_text()[-3000:] if log.exists() else done.stderr[-3000:]
    failed = [line for line in terminal if ": failed" in line]
    assert len(failed) == 1 and "ValueError: the schedule has no steps" in failed[0], terminal
    assert failed[0].endswith("no retries left [1/1 trials done, 0 running]")  # not a TTY: the standing
    assert terminal[-2:] == [f"full log: {log}", "released"] and len(terminal) == 3, terminal
    text = log.read_text()
    assert "NOISE from a C++ core" in text and "NOISE from a library" in text  # the worker's: streamed, maybe
    assert "Traceback" in text and "Trial status" in text
    assert "NOISE" not in done.stdout + done.stderr
    assert failed[0] in text and f"full log: {log}" in text  # the log has the terminal's lines too


def test_on_a_tty_the_progress_is_a_bar_redrawn_in_place_under_the_event_lines(monkeypatch):
    """A terminal (a TTY): the bar is redrawn on its own line at each report and cleared before
    an event line, which then ends without the standing (the bar shows it)."""
    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Tty()
    monkeypatch.setattr(console.terminal, "out", screen)
    monkeypatch.setattr(console.terminal, "_live", "")  # the drawn line: put back after the test
    progress = console.Progress(total=2, metric="val_ppl", mode="min", width=4)
    trials = [SimpleNamespace(trial_id="a", status="RUNNING"), SimpleNamespace(trial_id="b", status="PENDING")]
    progress.started(trials, "a")
    progress.result(trials, "a", 50.0)
    console.say("trial a: restart 1 at step 40")
    trials[0].status = "TERMINATED"
    assert progress.ended(trials, "a") == ""
    text = screen.getvalue()
    assert text.count("\r\x1b[K[....] 0/2 trials done, 1 running") >= 1
    bar = "\r\x1b[K[....] 0/2 trials done, 1 running, best val_ppl 50 (a)"
    assert bar + "\r\x1b[Ktrial a: restart 1 at step 40\n" + bar in text  # cleared, said, redrawn
    assert text.endswith("\r\x1b[K[##..] 1/2 trials done, 0 running, best val_ppl 50 (a)")

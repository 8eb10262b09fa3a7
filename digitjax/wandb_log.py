"""Mirror each seed's run records to Weights & Biases: one W&B run per seed.

The run folder's files (config.json, metrics.jsonl, summary.json) stay the ground truth;
W&B mirrors them and must never stop or stall training: init has a short timeout, an online
run that cannot start falls back to an offline one, and any error at start/log/finish warns
once and turns this logger off while training goes on.

In W&B: project `digitjax` (or $WANDB_PROJECT), entity $WANDB_ENTITY, group = the experiment
(`NAME+<hash>` for a config changed by --set, like its folder), name `<group>-seed<k>`,
job_type `train`. Every chart's x-axis is our optimizer `step` (a logged metric); W&B's own
`_step` just counts history rows, because W&B drops rows whose `_step` is lower than one it
already has, and our steps repeat when a run resumes from a checkpoint.

Resume. The W&B run id is drawn when a run starts from step 0 (first start, `--fresh`, or a
restart before its first checkpoint: its records start over, so does its W&B run) and kept
in `<run_dir>/wandb_run_id` for the attempts that resume from a checkpoint.
History rows are a fixed sequence (one per train row of metrics.jsonl, one per evaluation),
so a resumed attempt can tell exactly which rows W&B already has:
- online: the attempt resumes the same W&B run (resume="allow"); the server's row count
  (`run.starting_step`) rows are skipped, the rest (including rows only in metrics.jsonl,
  e.g. when earlier attempts were offline) are logged.
- offline: W&B cannot resume offline runs (wandb#2423, #4624), and syncing two offline runs
  with one id overwrites (#3841). So each attempt writes a complete offline run under the
  same id: it first replays the earlier rows of metrics.jsonl, and the earlier attempts'
  folders move to `<run_dir>/wandb/superseded/` (kept, but outside the
  `wandb sync <run_dir>/wandb/offline-run-*` glob).
"""

from __future__ import annotations

import configparser
import netrc
import os
import secrets
import socket
import string
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from . import records
from .config import ConfigError

PROJECT = "digitjax"
MODES = ("auto", "online", "offline", "off")
RUN_ID_FILE = "wandb_run_id"
SUPERSEDED = "superseded"
DEFAULT_HOST = "https://api.wandb.ai"
INIT_TIMEOUT_S = 20.0  # online init with a key but no network otherwise blocks ~100 s
FINISH_TIMEOUT_S = 60.0  # a stalled upload is cut off; `wandb sync` can finish it later
_ROW_KEYS = ("step", "epoch", "split")


def _say(message: str) -> None:
    print(f"digitjax: W&B: {message}", file=sys.stderr, flush=True)


def base_url(env=None) -> str:
    """The W&B server, found as wandb finds it: $WANDB_BASE_URL, then `base_url` in its
    settings file (`wandb login --host URL` writes it there), then the public server."""
    env = os.environ if env is None else env
    if env.get("WANDB_BASE_URL"):
        return env["WANDB_BASE_URL"]
    home = Path(env.get("HOME") or "~").expanduser()
    folder = Path(env["WANDB_CONFIG_DIR"]).expanduser() if env.get("WANDB_CONFIG_DIR") \
        else home / ".config" / "wandb"
    settings = configparser.ConfigParser()
    try:
        settings.read(folder / "settings")
    except configparser.Error:
        return DEFAULT_HOST
    return settings.get("default", "base_url", fallback="") or DEFAULT_HOST


def api_key_available(env=None) -> bool:
    """Whether W&B credentials exist locally ($WANDB_API_KEY or `wandb login`'s netrc entry).

    Checked before going online: online init without a key prompts on a terminal.
    """
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    url = urlsplit(base_url(env))
    path = env.get("NETRC") or Path(env.get("HOME") or "~").expanduser() / ".netrc"
    try:
        entries = netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        return False
    # wandb names the entry by host and port (`localhost:8080`); older logins by host.
    return any(entries.authenticators(m) is not None for m in (url.netloc, url.hostname) if m)


def reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the W&B host opens within `timeout_s`, DNS included."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    opened = []

    def probe():
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
            opened.append(True)
        except OSError:
            pass

    # A thread, because a DNS lookup without network can outlast any socket timeout.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(opened)


def resolve_mode(choice: str = "auto", env=None, probe=reachable) -> tuple[str, str]:
    """("online" | "offline" | "off", a warning or "") for `--wandb CHOICE`.

    The flag beats $WANDB_MODE; `auto` follows $WANDB_MODE when set, else goes online only
    with a key and a reachable host.
    """
    env = os.environ if env is None else env
    if choice not in MODES:
        raise ConfigError(f"--wandb {choice!r}: expected one of {', '.join(MODES)}")
    if choice == "auto":
        env_mode = env.get("WANDB_MODE", "").strip().lower()
        if env_mode == "disabled" or env.get("WANDB_DISABLED", "").lower() in ("1", "true"):
            return "off", ""
        if env_mode in ("offline", "dryrun"):
            return "offline", ""
        if env_mode not in ("online", "run"):
            if not api_key_available(env):
                return "offline", ""  # the documented default for users not logged in
            url = base_url(env)
            if not probe(url):
                return "offline", f"{urlsplit(url).hostname} unreachable; logging offline"
            return "online", ""
        choice = "online"
    if choice == "online" and not api_key_available(env):
        return "offline", ("no API key (run `wandb login` or set WANDB_API_KEY); "
                           "logging offline")
    return choice, ""


def new_run_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def run_id(run_dir: Path, *, fresh: bool = False) -> str:
    """The run folder's W&B id, kept in `<run_dir>/wandb_run_id`; a new one when `fresh`."""
    path = Path(run_dir) / RUN_ID_FILE
    if not fresh and path.exists() and path.read_text().strip():
        return path.read_text().strip()
    rid = new_run_id()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rid + "\n")
    return rid


def group_name(config_record: dict) -> str:
    """The experiment as its run folder names it: `NAME` or `NAME+<hash of --set>`."""
    tag = records.overrides_tag(config_record.get("overrides") or {})
    name = config_record["config"]["name"]
    return f"{name}+{tag}" if tag else name


def wandb_config(config_record: dict) -> dict:
    """config.json plus flat columns useful in W&B's runs table."""
    cfg = config_record["config"]
    flat = {
        "experiment": group_name(config_record),
        "dataset": cfg["data"]["dataset"],
        "model": cfg["model"]["name"],
        "augmentation": cfg["augment"]["name"],
        "optimizer": cfg["optimizer"]["name"],
        "learning_rate": cfg["optimizer"]["learning_rate"],
        "schedule": cfg["schedule"]["name"],
        "batch_size": cfg["train"]["batch_size"],
        "epochs": cfg["train"]["epochs"],
        "seed": config_record["seed"],
        "study": config_record.get("study") or "",
        "config_hash": config_record["config_hash"],
        "git_commit": (config_record.get("environment") or {}).get("git_commit"),
    }
    return {**config_record, **flat}


def tags(config_record: dict) -> list[str]:
    cfg = config_record["config"]
    return [f"data:{cfg['data']['dataset']}", f"model:{cfg['model']['name']}",
            f"augment:{cfg['augment']['name']}"]


def history_rows(rows: list[dict]) -> list[dict]:
    """W&B history rows for metrics.jsonl rows: one per train row, one per evaluation.

    An evaluation's val and test rows (same step) become one row of `val/...` and
    `test/...` keys. The grouping depends only on the rows, so it is the same every attempt.
    """
    out: list[dict] = []
    splits: list[set] = []
    for row in rows:
        split = row["split"]
        values = {f"{split}/{k}": v for k, v in row.items() if k not in _ROW_KEYS}
        if (split != "train" and out and out[-1]["step"] == row["step"]
                and "train" not in splits[-1] and split not in splits[-1]):
            out[-1].update(values)
            splits[-1].add(split)
        else:
            out.append({"step": row["step"], "epoch": row["epoch"], **values})
            splits.append({split})
    return out


def _supersede_offline_runs(wandb_dir: Path) -> None:
    """Move earlier attempts' offline runs aside: the new attempt holds their history too."""
    for old in sorted(wandb_dir.glob("offline-run-*")):
        if old.is_dir() and not old.is_symlink():
            dest = wandb_dir / SUPERSEDED / old.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            old.rename(dest)


class WandbLoggers:
    """`make_loggers(seed, run_dir)` for runner.run_experiment: one WandbLogger per seed.

    Resolves the mode once; after one online start fails (no network), later seeds of the
    process go offline at once instead of waiting out the timeout again.
    """

    def __init__(self, choice: str = "auto", *, env=None, probe=reachable):
        env = os.environ if env is None else env
        self.mode, warning = resolve_mode(choice, env, probe)
        if warning:
            _say(warning)
        self.project = env.get("WANDB_PROJECT") or PROJECT
        self.entity = env.get("WANDB_ENTITY") or None
        self.init_timeout_s = float(env.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT_S)
        self.online_failed = False

    def __call__(self, seed: int, run_dir: Path) -> list:
        return [] if self.mode == "off" else [WandbLogger(self)]


class WandbLogger:
    """One seed's W&B run: start(config_record, run_dir), log(rows), finish(summary)."""

    def __init__(self, session: WandbLoggers):
        self.session = session
        self.run = None
        self.run_dir: Path | None = None
        self.label = "W&B"
        self._replay_pending = True  # earlier attempts' rows go out with the first log()
        self._skip = 0  # history rows a resumed online run already has
        self._last_step = 0

    # -- the logger interface: never raises ------------------------------------------------
    def start(self, config_record: dict, run_dir: Path) -> None:
        self._guard("start", self._start, config_record, Path(run_dir))

    def log(self, rows: list[dict]) -> None:
        self._guard("log", self._log, rows)

    def log_images(self, paths) -> None:
        """Log image files (plots) as `plots/<file stem>`, after the last metrics row."""
        self._guard("log_images", self._log_images, [Path(p) for p in paths])

    def finish(self, summary: dict) -> None:
        self._guard("finish", self._finish, summary)

    def _guard(self, stage: str, fn, *args) -> None:
        if stage != "start" and self.run is None:
            return
        try:
            fn(*args)
        except Exception as e:  # W&B must never stop training
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            _say(f"{self.label}: stopped logging after an error in {stage} "
                 f"({type(e).__name__}: {first_line}); training goes on, the run's files "
                 "are complete")
            run, self.run = self.run, None
            if run is not None:
                try:
                    run.finish(exit_code=1)
                except Exception:
                    pass

    # -- the work --------------------------------------------------------------------------
    def _start(self, config_record: dict, run_dir: Path) -> None:
        import wandb

        s = self.session
        group = group_name(config_record)
        self.run_dir = run_dir
        self.label = f"{group} seed{config_record['seed']}"
        kwargs = dict(
            project=s.project, entity=s.entity, group=group, job_type="train",
            name=f"{group}-seed{config_record['seed']}", tags=tags(config_record),
            config=wandb_config(config_record), dir=str(run_dir),
            # A run starting from step 0 is a new W&B run: resuming the old id would keep
            # the earlier attempt's history (online, the first rows would be skipped).
            id=run_id(run_dir, fresh=config_record["resumed_from_step"] is None),
            reinit="create_new",  # several seeds in one process are several W&B runs
            settings=wandb.Settings(init_timeout=s.init_timeout_s,
                                    finish_timeout=FINISH_TIMEOUT_S, silent=True,
                                    console="off", disable_git=True))
        mode = "offline" if s.online_failed else s.mode
        if mode == "online":
            try:
                self.run = wandb.init(mode="online", resume="allow", **kwargs)
            except Exception as e:  # e.g. CommError after init_timeout
                s.online_failed = True
                mode = "offline"
                _say(f"{self.label}: could not start an online run ({type(e).__name__}); "
                     "logging offline instead")
        if mode == "offline":
            try:
                _supersede_offline_runs(run_dir / "wandb")
            except OSError as e:
                _say(f"{self.label}: could not move earlier offline runs aside ({e})")
            self.run = wandb.init(mode="offline", **kwargs)
        self._skip = self.run.starting_step if self.run.resumed else 0
        self._define_metrics()

    def _define_metrics(self) -> None:
        run = self.run
        run.define_metric("step")  # our optimizer step: the x-axis of every chart
        for pattern in ("epoch", "train/*", "val/*", "plots/*"):
            run.define_metric(pattern, step_metric="step")
        run.define_metric("val/accuracy", step_metric="step", summary="max")
        # The test summary is set at finish to the reported checkpoint's (chosen on
        # validation), never the last or the best test value seen.
        run.define_metric("test/*", step_metric="step", summary="none")

    def _earlier_rows(self, current: list[dict]) -> list[dict]:
        """Rows of metrics.jsonl before `current` (a resumed attempt's history so far)."""
        rows = records.read_metrics(self.run_dir / records.METRICS)
        n = len(rows) - len(current)
        key = lambda r: (r["step"], r["split"])
        if n < 0 or [key(r) for r in rows[n:]] != [key(r) for r in current]:
            return []  # the file does not end with these rows: nothing safe to replay
        return rows[:n]

    def _log(self, rows: list[dict]) -> None:
        if self._replay_pending:
            self._replay_pending = False
            rows = self._earlier_rows(rows) + rows
        for payload in history_rows(rows):
            self._last_step = payload["step"]
            if self._skip:
                self._skip -= 1
                continue
            self.run.log(payload)

    def _log_images(self, paths: list[Path]) -> None:
        import wandb

        self._log([])
        self.run.log({"step": self._last_step,
                      **{f"plots/{p.stem}": wandb.Image(str(p)) for p in paths}})

    def _finish(self, summary: dict) -> None:
        self._log([])  # a resumed attempt with no rows left still mirrors the history
        run = self.run
        run.summary.update({k: v for k, v in summary.items() if v is not None})
        for key in ("test/accuracy", "test/loss", "val/loss"):  # the reported checkpoint's
            if key.replace("/", "_") in summary:
                run.summary[key] = summary[key.replace("/", "_")]
        offline = run.settings.mode == "offline"
        where = run.settings.sync_dir if offline else run.url
        run.finish(exit_code=0 if summary.get("status") == "completed" else 1)
        self.run = None
        if offline:
            _say(f"{self.label}: offline run saved; upload with: wandb sync {where}")
        else:
            _say(f"{self.label}: {where}")


def make_loggers(choice: str = "auto") -> WandbLoggers | None:
    """runner.run_experiment's `make_loggers` for `--wandb CHOICE`; None when off."""
    loggers = WandbLoggers(choice)
    return loggers if loggers.mode != "off" else None

"""Train a face (or re-ID) model: `torchrun [--nnodes N --nproc_per_node G --rdzv_backend=c10d
--rdzv_endpoint=HOST:PORT] launch/train_face.py [--config configs/X.yaml] [section.key=value ...]`.

Without arguments it runs configs/default.yaml, the CPU demo on the embedded glyph data. NCCL on
GPUs, gloo on CPU, chosen from the device. Everything else lives in facetrain.trainer.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
DATA_HINT = ("build the embedded glyph data first (the README's main command does it too):\n"
             "  python data_tools/build_glyphs.py\n"
             "  python data_tools/make_longtail.py --input data/glyphs/train --head 100 "
             "--tail-samples 3\n"
             "or point data.rec at your own RecordIO prefix (data.rec=/path/to/train)")


def config_sections_help() -> str:
    """The config sections and their fields with defaults, read from the Config dataclasses
    themselves so the help can never drift from the code."""
    import dataclasses
    import textwrap
    import typing

    from facetrain.config import Config

    out = ["config sections (override any field as section.key=value; nested: "
           "head.margin.kind=arcface):"]
    for section, cls in typing.get_type_hints(Config).items():
        if not dataclasses.is_dataclass(cls):
            continue
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        fields = []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not
                                        dataclasses.MISSING else None):
                fields.append(f"{f.name}.*")
            elif f.default is not dataclasses.MISSING:
                fields.append(f"{f.name}={f.default!r}")
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
                fields.append(f"{f.name}.*" if dataclasses.is_dataclass(value)
                              else f"{f.name}={value!r}")
            else:
                fields.append(f.name)
        out.append(f"  {section}: {doc}")
        out.extend(textwrap.wrap(", ".join(fields), width=96, initial_indent="      ",
                                 subsequent_indent="      "))
    out.append("")
    out.extend(textwrap.wrap(
        "Where every field is documented: facetrain/config.py (each field with its rule, "
        "range and meaning; a misspelled key or a bad value is an error naming it), the "
        "README (Training, Data tools, LEAP configuration), docs/leap.md (the leap: section "
        "against the paper), docs/long_tail_remedies.md (head.class_balance_beta, "
        "data.repeat_factor_threshold) and docs/heads.md (head.margin.kind and the other "
        "margin heads, head.logit_adjust_tau, head.interclass_filter).", width=100))
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=config_sections_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="YAML experiment config (default: configs/default.yaml, the CPU demo)")
    p.add_argument("--engine", choices=("ddp", "deepspeed"), default=None,
                   help="training engine; same as train.engine=... (default: the config's)")
    p.add_argument("--output-dir", default=None,
                   help="run folder; same as train.output_dir=... (default: the config's)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted config overrides, e.g. optim.lr=0.05 leap.mode=off")
    return p.parse_args(argv)


def _data_present(rec: str) -> bool:
    path = Path(rec)
    if path.is_dir():
        return any(path.glob("*.rec"))
    return (path.with_suffix(".rec").is_file() or Path(rec + ".rec").is_file() or path.is_file()
            or any(path.parent.glob(path.name + "_*.rec")))      # shards prefix_000.rec, ...


SILENT_RANK_GRACE_S = 3.0


def _say(message: str, every_node: bool = False) -> None:
    """Print an error once per job (rank 0), or once per node for what can differ by node
    (files on local disks). Every rank reaches the same conclusion; only one speaks."""
    import os

    import time

    key = "LOCAL_RANK" if every_node else "RANK"
    if int(os.environ.get(key, "0")) == 0:
        print(message, file=sys.stderr, flush=True)
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun stops the whole job as soon as one rank has failed: a silent rank that
        # exits first (it has nothing to print) could get the speaking rank killed before its
        # message is out. There is no process group yet to wait on, so give it a moment.
        time.sleep(SILENT_RANK_GRACE_S)


def _one_line(err: BaseException) -> str:
    """The message of an error raised in a DataLoader worker without the worker's traceback,
    which torch pastes into the message text."""
    text = str(err)
    if "Original Traceback" in text:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        last = lines[-1]
        text = last.split(": ", 1)[1] if last.startswith(type(err).__name__ + ":") else last
    return text


def main(argv=None, after_step: Optional[Callable[[int], None]] = None) -> int:
    """Train from the command line `argv`; after_step is passed to Trainer.fit (a seam for
    programs that wrap this one, e.g. a test's fault injection)."""
    from facetrain.config import ConfigError, load_config
    from facetrain.dist import (SetupFailedError, finish, init_distributed, raise_if_any_failed,
                                reported)
    from facetrain.run_lock import RunLock, RunLockedError
    from facetrain.trainer import USER_ERRORS, NonFiniteLossError, Trainer

    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.engine:
        overrides.append(f"train.engine={args.engine}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        _say(f"train_face.py: config error: {err}")
        return 2
    if not cfg.data.rec:
        _say(f"train_face.py: data.rec is not set (in {args.config} or an override); {DATA_HINT}",
             every_node=True)
        return 2
    if not cfg.train.output_dir:
        _say(f"train_face.py: train.output_dir is not set (in {args.config} or an override); "
             "give the run folder with --output-dir PATH or train.output_dir=PATH",
             every_node=True)
        return 2
    if not _data_present(cfg.data.rec):
        _say(f"train_face.py: training data {cfg.data.rec!r} (from {args.config}) is missing; "
             f"{DATA_HINT}", every_node=True)
        return 2
    ctx = init_distributed(cfg.train.device)
    interrupt = _Interrupt()
    # One run per output folder: rank 0 takes the lock before any rank reads the folder's
    # checkpoints, and every rank learns the outcome from the same pre-training agreement.
    lock = RunLock(Path(cfg.train.output_dir)) if ctx.is_main else None
    if lock is not None:
        interrupt.release_lock_on_sigterm(lock)
    try:
        lock_err: Optional[BaseException] = None
        if lock is not None:
            try:
                lock.acquire()
            except (RunLockedError, OSError) as exc:
                lock_err = exc
        raise_if_any_failed(ctx, lock_err)
        trainer = Trainer(cfg, ctx)
        if lock is not None and lock.taken_over:
            trainer.log.warning(lock.taken_over)
        trainer.fit(after_step=after_step)
        # Only after success: a collective teardown while a peer is stuck elsewhere would
        # hang, and torchrun ends the other ranks of a failed job anyway.
        del trainer
        finish(ctx)
    except SetupFailedError as err:          # bad input found before training, agreed
        if err.report:
            print(f"train_face.py: {_one_line(err.cause)}", file=sys.stderr, flush=True)
        reported(ctx)
        return 2
    except USER_ERRORS as err:
        print(f"train_face.py: rank {ctx.rank}: {_one_line(err)}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as err:
        if ctx.is_main:          # every rank sees the same global loss
            print(f"train_face.py: {err}", file=sys.stderr, flush=True)
        return 3
    except BaseException as err:
        if interrupt.fired or isinstance(err, KeyboardInterrupt):
            # Ctrl-C reaches every rank (and torchrun sends it again): one line per run.
            if ctx.is_main:
                print(f"train_face.py: stopped by Ctrl-C (SIGINT); the last checkpoint in "
                      f"{Path(cfg.train.output_dir) / 'checkpoints'} is kept; run the same "
                      "command to resume", file=sys.stderr, flush=True)
            return 130
        if _peer_lost(err):
            # A peer rank stopped (it prints its own reason, or torchrun names its signal):
            # this rank's view of that is a gloo/NCCL "connection closed" traceback that only
            # hides the peer's message.
            return 1
        raise
    finally:
        if lock is not None:
            lock.release()
        interrupt.restore()
    return 0


# What a rank sees when a peer process has gone away mid-collective (gloo over TCP, NCCL).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "NCCL communicator was aborted", "remote process exited")


def _peer_lost(err: BaseException) -> bool:
    """True for a communication error caused by a peer rank that already stopped."""
    return isinstance(err, RuntimeError) and any(s in str(err) for s in PEER_LOST)


class _Interrupt:
    """Ctrl-C as one KeyboardInterrupt per process: the terminal sends SIGINT to every rank and
    torchrun forwards another; a second one while the first unwinds would print a traceback."""

    def __init__(self) -> None:
        import signal
        import threading

        self.fired = False
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)

    def release_lock_on_sigterm(self, lock: Any) -> None:
        """On SIGTERM (torchrun stopping the job, a scheduler's cancel) remove the run lock,
        then end as SIGTERM always did: at once, by the default action."""
        import os
        import signal

        def handler(signum: int, frame: object) -> None:
            lock.release()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        if self._previous:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, handler)

    def restore(self) -> None:
        """Put back the handlers that were there before (a caller of main() keeps its own)."""
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.fired:
            return
        self.fired = True
        raise KeyboardInterrupt


# Exits that leave without interpreter finalization: success, a lost peer, Ctrl-C.
QUIET_EXITS = (0, 1, 130)


def _exit_now(code: int) -> None:
    """Leave without interpreter finalization once a run has succeeded.

    By then every output is written and closed, every rank has passed the final barrier and the
    process group is destroyed: finalization has nothing left to do for us, and it is the phase
    where C++ threads of the communication and loader stacks are torn down in no fixed order
    (the reported "terminate called without an active exception" SIGABRT after "done", which
    made torchrun kill the other rank mid-export). A run stopped by Ctrl-C or by a lost peer
    leaves the same way, so that teardown adds nothing to its one line. Other failures exit
    normally, with tracebacks."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    rc = main()
    if rc in QUIET_EXITS:
        _exit_now(rc)
    sys.exit(rc)

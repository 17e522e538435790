"""What every module needs and no stage owns: the one-line error for bad input, atomic file
writes, safetensors read/write, the command line (an argument parser whose errors are one line,
option types that declare their valid range once, the rules between options and the pre-flight checks
of paths and devices, the output-directory lock) and the runner that turns a UserError into
`error: ...`, exit 2, and keeps a run alive when its stdout or stderr is closed.

It imports no other module of the project, so any module may import it.
"""

import argparse
import atexit
import contextlib
import json
import math
import os
import signal
import socket
import sys
import tempfile
import threading
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file


class UserError(Exception):
    """Bad input from the user: the message is one line saying what, where and how to fix."""


# ----------------------------------------------------------------------------- atomic writes

def _plain_mode():
    """The mode a plain open() gives a new file: 0o666 less the umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_beside(path):
    """A temporary file in path's directory with the mode a plain open() would give (mkstemp makes 0600)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.fchmod(fd, _plain_mode())
    return fd, tmp


def atomic_write(path, data):
    """Write str or bytes to a temporary file, then rename it: readers never see half a file."""
    fd, tmp = _temp_beside(path)
    with os.fdopen(fd, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    os.replace(tmp, path)


def atomic_write_json(obj, path):
    """Write JSON to a temporary file, then rename: a crash leaves the old file or the new one."""
    atomic_write(path, json.dumps(obj, indent=2))


# ----------------------------------------------------------------------------- safetensors

def unique_state_dict(module):
    """state_dict without tied duplicates (lm_head.weight is wte.weight), which safetensors refuses."""
    seen, out = set(), {}
    for k, v in module.state_dict().items():
        if v.data_ptr() in seen and v.numel() > 0:
            continue
        seen.add(v.data_ptr())
        out[k] = v
    return out


def atomic_save_safetensors(tensors, path, metadata=None):
    fd, tmp = _temp_beside(path)
    os.close(fd)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.chmod(tmp, _plain_mode())  # save_file writes a new file of mode 0600 in place of the temporary one
    os.replace(tmp, path)


def check_tensors_fit(expected, tensors, where, what="checkpoint"):
    """Refuse tensors that do not fit what a model expects (name -> tensor): missing, unexpected or
    mis-shaped entries, the first three of each named in one line."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [f"{k} {tuple(tensors[k].shape)} (model wants {tuple(v.shape)})"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or extra or wrong:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                 f"mis-shaped {wrong[:3]}" if wrong else ""]
        raise UserError(f"{where}: {what} does not fit the model: " + "; ".join(p for p in parts if p))


def read_safetensors(path):
    """Tensors of a safetensors file (a format that holds only arrays: no code can run on load)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise UserError(f"{path}: file not found")
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable safetensors file ({e})")


# ----------------------------------------------------------------------------- option types with a range

def _ranged(name, convert, ok, what, bad_values):
    """An argparse `type=` that converts the string and checks the range, so each option declares its
    valid range once: `--batch-size 0` ends in `error: --batch-size must be a positive integer, not 0`.
    bad_values: values outside the range, which tests/test_cli.py tries on every option of this type."""
    def check(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    check.__name__, check.bad_values = name, bad_values
    return check


positive_int = _ranged("positive_int", int, lambda v: v >= 1, "a positive integer", ["0", "-1", "x"])
nonneg_int = _ranged("nonneg_int", int, lambda v: v >= 0, "an integer >= 0", ["-1", "1.5"])
positive_float = _ranged("positive_float", float, lambda v: v > 0, "a number > 0", ["0", "-1", "nan"])
nonneg_float = _ranged("nonneg_float", float, lambda v: v >= 0, "a number >= 0", ["-1", "inf"])
fraction = _ranged("fraction", float, lambda v: 0 < v < 1, "a fraction in (0, 1)", ["0", "1", "1.5", "-1"])
fraction0 = _ranged("fraction0", float, lambda v: 0 <= v < 1, "a fraction in [0, 1)", ["1", "1.5", "-1"])
prob = _ranged("prob", float, lambda v: 0 <= v <= 1, "a number in [0, 1]", ["1.5", "-1"])
positive_prob = _ranged("positive_prob", float, lambda v: 0 < v <= 1, "a number in (0, 1]", ["0", "1.5", "-1"])
RANGED_TYPES = (positive_int, nonneg_int, positive_float, nonneg_float, fraction, fraction0, prob, positive_prob)


# ----------------------------------------------------------------------------- the command line

def _shows_default(action):
    return action.default is not None and action.default is not False and action.default != argparse.SUPPRESS


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default in --help unless its help says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and _shows_default(action)
                and not any(s in text for s in ("(default", "default:", "%(default"))):
            text += " (default: %(default)s)"
        return text


class Args(argparse.Namespace):
    """Parsed options. `.given` (the options typed on the command line, so --resume can tell them from
    defaults) is a slot, outside vars(args), which stages save as JSON."""
    __slots__ = ("given",)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: --lr must be a number > 0, not -1`, exit 2: no usage
    block) and the options given on the command line recorded in args.given."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def format_help(self):
        for a in self._actions:  # argparse lists an option without help text bare: give it its default
            if a.help is None and a.option_strings and _shows_default(a):
                a.help = "default: %(default)s"
        return super().format_help()

    def error(self, message):
        # argparse says "argument --lr: must be ..."; the range types read better as "--lr must be ..."
        if message.startswith("argument ") and ": must be " in message:
            message = message[len("argument "):].replace(": must be ", " must be ", 1)
        print(f"error: {message} (see --help)" if "must be" not in message else f"error: {message}",
              file=sys.stderr)
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, Args() if namespace is None else namespace)
        # parse again into a namespace pre-filled with a marker: argparse then sets no defaults, and
        # every option still holding the marker was not on the command line
        unset = object()
        probe = argparse.Namespace(**{a.dest: unset for a in self._actions if a.dest != argparse.SUPPRESS})
        super().parse_known_args(args, probe)
        if isinstance(ns, Args):
            ns.given = frozenset(k for k, v in vars(probe).items() if v is not unset)
        return ns


# ----------------------------------------------------------------------------- pre-flight checks

class Rule(NamedTuple):
    """A rule between options, checked right after parsing: broken(args) is true when the command line breaks
    it; message (formatted with a=args) names the options; example is a command line that breaks it, which
    tests/test_cli.py tries for every rule of every stage."""
    broken: Callable
    message: str
    example: tuple


def check_rules(args, rules):
    """The first rule the command line breaks, as one line: `--n-embd 64 must be divisible by --n-head 3`."""
    for rule in rules:
        if rule.broken(args):
            raise UserError(rule.message.format(a=args))


def no_effect(option, when, why, example):
    """The Rule for an option typed where it changes nothing: `--n-layer has no effect with --preset ...`.
    when(args) says when it has none."""
    dest = option.lstrip("-").replace("-", "_")
    return Rule(lambda a: dest in getattr(a, "given", ()) and when(a),
                f"{option} has no effect {why}; drop it", tuple(example))


def check_device(name):
    """--device before any work: auto picks cuda, then mps, then cpu; a device this torch cannot use is one
    line (a CPU-only torch asked for cuda, cuda:N past the last GPU, mps off a Mac) -> the device's name."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if name != "cpu" and (kind not in ("cuda", "mps") or (index and not (kind == "cuda" and index.isdigit()))):
        raise UserError(f"--device {name}: use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this torch has no CUDA (a CPU-only build, or no GPU found); "
                        "use --device cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS (Apple GPUs) is not available on this machine; use --device cpu")
    return name


def check_input_files(option, paths, kind=".jsonl"):
    """An input option names files: a directory is one line that lists the files in it to pass instead
    (a missing file is left to the reader, whose line says how to make it)."""
    for path in [paths] if isinstance(paths, str) else paths or []:
        if os.path.isdir(path):
            inside = sorted(f for f in os.listdir(path) if f.endswith(kind))
            raise UserError(f"{option} {path} is a directory; pass the {kind} files in it" +
                            (f" ({', '.join(os.path.join(path, f) for f in inside[:3])}"
                             f"{', ...' if len(inside) > 3 else ''})" if inside else ""))


def check_checkpoint_dir(path, option):
    """A checkpoint option names a directory holding config.json: a file inside one, or a directory
    above several (out/), is one line saying which directory to pass."""
    named = f"{option} {path}" if option else path
    if os.path.isfile(path):
        raise UserError(f"{named} is a file; pass the checkpoint directory that holds it "
                        f"({os.path.dirname(path) or '.'})")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        inside = sorted(os.path.join(path, d) for d in os.listdir(path)
                        if os.path.exists(os.path.join(path, d, "config.json")))
        if inside:
            raise UserError(f"{named} is not a checkpoint but holds {len(inside)}: "
                            f"{', '.join(inside[:6])}{', ...' if len(inside) > 6 else ''}; pass one of them")


def check_out_is_not_an_input(out, inputs):
    """--out never names a directory the run reads (inputs: {option: path}): training would overwrite it."""
    for option, path in inputs.items():
        if path and os.path.realpath(path) == os.path.realpath(out):
            raise UserError(f"--out {out} is the {option} directory: the run would overwrite what it reads; "
                            "choose another --out")


# ----------------------------------------------------------------------------- the output directory

def _lock_owner(lock):
    """-> (pid, host) written in a lock file, or None when it cannot be read."""
    try:
        pid, host = open(lock).read().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _release_lock(lock, pid):
    if _lock_owner(lock) == (pid, socket.gethostname()):
        try:
            os.remove(lock)
        except OSError:
            pass


def claim_output_dir(path, option="--out"):
    """Check the output directory before any work (creatable, a directory, writable) and lock it:
    OUT/.lock holds "pid host" while this process writes there and goes when it exits. A lock of a
    process that no longer runs on this host is stale and taken over."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{option} {path} is a file, not a directory; choose another {option}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{option} {path}: cannot create the directory ({e.strerror}); choose another {option}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: the directory is not writable; choose another {option}")
    lock, me, host = os.path.join(path, ".lock"), os.getpid(), socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and owner[0] != me and (owner[1] != host or _alive(owner[0])):
                where = "" if owner[1] == host else f" on {owner[1]}"
                raise UserError(f"{path} is in use by process {owner[0]}{where}; wait for it to finish or "
                                f"choose another {option} (delete {lock} if that process is gone)") from None
            try:
                os.remove(lock)  # stale, unreadable, or our own from an earlier call in this process
            except FileNotFoundError:
                pass
            continue
        except OSError as e:
            raise UserError(f"{option} {path}: cannot write there ({e.strerror}); choose another {option}")
        with os.fdopen(fd, "w") as f:
            f.write(f"{me} {host}\n")
        atexit.register(_release_lock, lock, me)
        return
    raise UserError(f"{path}: cannot take {lock}; another run is starting there")


# ----------------------------------------------------------------------------- the runner

STOP_SIGNAL = None  # set by training.StopFlag when Ctrl-C / SIGTERM asked a run to stop early


def note_stop_signal(signum):
    global STOP_SIGNAL
    STOP_SIGNAL = signum


def _exit_on_sigterm(signum, frame):
    print("\nerror: terminated (SIGTERM); every file is written whole or not at all", file=sys.stderr)
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: atexit handlers (the lock) still run


class StreamGuard:
    """stdout or stderr that outlives its reader: once the pipe is closed (`python sft.py | head -2`) or the
    file fails, what is written goes to /dev/null instead of raising BrokenPipeError, so the run trains and
    saves to its end (metrics.jsonl keeps every logged step)."""

    def __init__(self, stream):
        self.stream = stream

    def _gone(self):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())  # what is still buffered flushes into /dev/null at exit
            os.close(devnull)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def write(self, text):
        try:
            return self.stream.write(text)
        except (OSError, ValueError):  # OSError: a closed pipe (EPIPE) or a failing file; ValueError: closed
            self._gone()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self._gone()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def guard_streams():
    """Wrap sys.stdout and sys.stderr in StreamGuard (once): logging never kills a run."""
    if not isinstance(sys.stdout, StreamGuard):
        sys.stdout = StreamGuard(sys.stdout)
    if not isinstance(sys.stderr, StreamGuard):
        sys.stderr = StreamGuard(sys.stderr)


@contextlib.contextmanager
def signals_deferred(signals=(signal.SIGINT, signal.SIGTERM)):
    """Ctrl-C and SIGTERM wait until the block ends, then arrive as usual (the first one): for a call into a
    library's thread pool (tiktoken's encode_ordinary_batch), where an exception raised in the middle of
    its locking leaves the pool's workers waiting forever and the process hung. Python runs signal
    handlers in the main thread only, so off it the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


def run_cli(main):
    """Run a stage's main(); bad input ends in one line on stderr and exit code 2, Ctrl-C in exit 130
    (143 for SIGTERM), and a run stopped early by a signal (its state saved) exits 128 + the signal
    number too, so a script never takes it for finished. A closed stdout or stderr never stops it."""
    note_stop_signal(None)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    guard_streams()
    try:
        main()
        if dist.is_available() and dist.is_initialized():
            # leave together: the master still evaluates and saves after the loop, and a process that
            # tears the group down while its peer still uses it can be aborted by gloo
            dist.barrier()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nerror: interrupted (Ctrl-C); every file is written whole or not at all, nothing is "
              "half-written", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()  # through the guard: a reader gone before the last lines costs nothing
        sys.stderr.flush()
    if STOP_SIGNAL is not None:
        sys.exit(128 + STOP_SIGNAL)


def unwrap(model):
    """The model itself under wrap_model's layers: DistributedDataParallel (.module) around torch.compile
    (._orig_mod), peeled in that order; a bare model as it is."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)

"""What every module needs and no stage owns: the one-line error for bad input, atomic file
writes, safetensors read/write, and the runner that turns a UserError into `error: ...`, exit 2.

It imports no other module of the project, so any module may import it.
"""

import json
import os
import sys
import tempfile

import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file


class UserError(Exception):
    """Bad input from the user: the message is one line saying what, where and how to fix."""


# ----------------------------------------------------------------------------- atomic writes

def _temp_beside(path):
    """A temporary file in path's directory with the mode a plain open() would give (mkstemp makes 0600)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
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
    os.replace(tmp, path)


def read_safetensors(path):
    """Tensors of a safetensors file (a format that holds only arrays: no code can run on load)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise UserError(f"{path}: file not found")
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable safetensors file ({e})")


# ----------------------------------------------------------------------------- the command line

def run_cli(main):
    """Run a stage's main(); bad input ends in one line on stderr and exit code 2."""
    try:
        main()
        if dist.is_available() and dist.is_initialized():
            # leave together: the master still evaluates and saves after the loop, and a process that
            # tears the group down while its peer still uses it can be aborted by gloo
            dist.barrier()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

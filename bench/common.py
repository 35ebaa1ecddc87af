"""What the benchmarks share: the machine description and the docs/BENCHMARKS.md writer."""

import os
import platform
import re
import sys
from pathlib import Path

import torch

import tpx_ext

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"


def machine_description(device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), tpx_ext CUDA kernels compiled: {tpx_ext.cuda_compiled()}")
    if str(device).startswith("cuda"):
        desc += f", GPU: {torch.cuda.get_device_name()}"
    return desc


def write_section(name: str, argv, body: str, device="cpu", key=None) -> Path:
    """Replace the text between <!-- name:begin --> and <!-- name:end --> in BENCHMARKS.md
    (appending the markers if they are missing) with the command `python <name> <argv>`
    (argv None: sys.argv[1:]) and `body`. A GPU run writes its own section
    (<!-- name cuda:begin -->, in the CUDA part of the page), so it never replaces the
    CPU table. `key` names the section when one script writes two."""
    cmd = f"python {name} " + " ".join(sys.argv[1:] if argv is None else argv)
    body = f"Command: `{cmd.strip()}`\n\n{body}"
    key = key or name
    key = key if torch.device(device).type == "cpu" else f"{key} {torch.device(device).type}"
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    section = f"{begin}\n{body.strip()}\n{end}"
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    BENCHMARKS_MD.write_text(text)
    return BENCHMARKS_MD

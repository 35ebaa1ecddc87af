"""Downloads the wheels that scripts/gpu_check.sh needs on a GPU machine without a package
index whose Python already has torch, numpy, pytest and the like, but not the dmc extra.

    python scripts/gpu_wheels.py          # into build/wheels/, for CPython 3.12, x86-64 Linux
    scripts/gpu_check.sh --out DIR --wheels build/wheels   # then, on the GPU machine

The wheels are dm_control and mujoco with the packages of theirs that such an image lacks,
and expecttest (the dev extra), at the versions installed beside this script's Python where
it has them (the ones the tests ran with). dm_control's wheel is 56 MB, 39 MB of it
locomotion assets that dm_control.suite never loads: it is rewritten without them, which
leaves about 50 MB in all.
"""

import argparse
import importlib.metadata
import os
import subprocess
import sys
import zipfile

PINNED = {"dm_control": "1.0.50", "mujoco": "3.17.0"}  # as in pyproject.toml's dreamer extra
OTHERS = ("dm-env", "dm-tree", "labmaze", "glfw", "pyopengl", "websockets", "expecttest")
DROP = "dm_control/locomotion/"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def requirements():
    reqs = [f"{name}=={version}" for name, version in PINNED.items()]
    for name in OTHERS:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def slim_wheel(path, drop=DROP):
    """Rewrites the wheel at `path` without the files under `drop`, and its RECORD to match.
    Returns the number of bytes saved."""
    before = os.path.getsize(path)
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for info in src.infolist():
            if info.filename.startswith(drop) or info.filename == record:
                continue
            dst.writestr(info, src.read(info.filename))
        lines = [line for line in src.read(record).decode().splitlines()
                 if line and not line.startswith(drop)]
        dst.writestr(record, "\n".join(lines) + "\n")
    os.replace(tmp, path)
    return before - os.path.getsize(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", default=os.path.join("build", "wheels"),
                   help="folder for the wheels (default build/wheels, which git ignores)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    a = p.parse_args(argv)
    if not a.python_version.replace(".", "").isdigit() or a.python_version.count(".") != 1:
        p.error(f"--python-version wants MAJOR.MINOR, e.g. 3.12; got {a.python_version!r}")
    os.makedirs(a.dest, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", a.python_version, "--implementation", "cp", "-d", a.dest]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += requirements()
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    for name in sorted(os.listdir(a.dest)):
        if name.startswith("dm_control-") and name.endswith(".whl"):
            saved = slim_wheel(os.path.join(a.dest, name))
            print(f"{name}: {saved / 1e6:.0f} MB of {DROP} left out")
    total = sum(os.path.getsize(os.path.join(a.dest, n)) for n in os.listdir(a.dest))
    print(f"{a.dest}: {len(os.listdir(a.dest))} files, {total / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU image's recipe, checked without a container engine (none runs on these machines).

Runtime: about a second.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
CPU_LOCK = REPO / "requirements" / "cpu.lock"
CUDA_LOCK = REPO / "requirements" / "cuda.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def canonical(name: str) -> str:
    """PEP 503 name: case, '-', '_' and '.' do not distinguish packages."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"{path.name}:{lineno}: not an exact pin: {line!r}"
        name = canonical(match.group(1))
        assert name not in pins, f"{path.name}:{lineno}: {name} pinned twice"
        pins[name] = match.group(2)
    return pins


def documented_differences() -> set[str]:
    """Packages cuda.lock's header says differ from cpu.lock ("# differs: NAME  reason")."""
    names = re.findall(r"^# differs: (\S+)\s+\S", CUDA_LOCK.read_text(), flags=re.MULTILINE)
    return {canonical(name) for name in names}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, its text) of the Dockerfile, continuation lines joined, comments left out."""
    result, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or (not current and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (current + line).strip().partition(" ")
        result.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return result


def pip_install_arguments() -> list[list[str]]:
    """The arguments of every `pip install` in a RUN instruction."""
    found = []
    for keyword, text in instructions():
        if keyword != "RUN":
            continue
        command: list[str] = []
        for token in shlex.split(text) + ["&&"]:
            if token in ("&&", "||", ";"):
                if command[:2] == ["pip", "install"]:
                    found.append(command[2:])
                command = []
            else:
                command.append(token)
    return found


def copies() -> list[tuple[str, str]]:
    """(source, destination) of every COPY."""
    pairs = []
    for keyword, text in instructions():
        if keyword == "COPY":
            args = [a for a in shlex.split(text) if not a.startswith("--")]
            assert "--from" not in text, "COPY --from is not expected here"
            pairs += [(source, args[-1]) for source in args[:-1]]
    return pairs


def test_locks_are_exact_pins():
    assert read_lock(CPU_LOCK)
    assert read_lock(CUDA_LOCK)


def test_image_installs_the_cuda_lock():
    destinations = {source: destination for source, destination in copies()}
    lock_in_image = destinations.get("requirements/cuda.lock")
    assert lock_in_image, "the Dockerfile does not COPY requirements/cuda.lock"
    installs = pip_install_arguments()
    assert any(args[args.index("-r") + 1] == lock_in_image for args in installs if "-r" in args), (
        f"no `pip install -r {lock_in_image}` in {installs}"
    )


def test_every_pinned_install_matches_the_lock():
    lock = read_lock(CUDA_LOCK)
    pinned = [token for args in pip_install_arguments() for token in args if "==" in token]
    assert pinned, "expected the Dockerfile to pin pip itself"
    for token in pinned:
        match = PIN.match(token)
        assert match, f"Dockerfile: {token!r} is not name==version"
        name, version = canonical(match.group(1)), match.group(2)
        assert lock.get(name) == version, f"Dockerfile installs {token}, requirements/cuda.lock has {lock.get(name)}"


def test_other_installs_are_the_project_without_dependencies():
    for args in pip_install_arguments():
        if "-r" in args or all("==" in a for a in args):
            continue
        assert "--no-deps" in args, f"`pip install {' '.join(args)}` would resolve packages outside the lock"


def test_every_copied_file_exists():
    assert copies()
    for source, _ in copies():
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"


def test_locks_agree_except_documented_differences():
    cpu, cuda = read_lock(CPU_LOCK), read_lock(CUDA_LOCK)
    allowed = documented_differences()
    assert allowed <= set(cpu) | set(cuda), f"cuda.lock documents differences for unknown packages: {allowed}"
    for name in sorted((set(cpu) | set(cuda)) - allowed):
        assert cpu.get(name) == cuda.get(name), (
            f"{name}: cpu.lock has {cpu.get(name)}, cuda.lock has {cuda.get(name)} and its header does not say why"
        )


def test_entrypoint_is_the_copied_script():
    entrypoints = [json.loads(text) for keyword, text in instructions() if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1, "expected one ENTRYPOINT, in exec (JSON) form"
    workdir = [text for keyword, text in instructions() if keyword == "WORKDIR"][-1]
    in_image = {os.path.normpath(os.path.join(workdir, destination)): source for source, destination in copies()}
    assert in_image.get(entrypoints[0][0]) == "docker/entrypoint.sh", f"ENTRYPOINT {entrypoints[0]} is not docker/entrypoint.sh"
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR, "docker/entrypoint.sh is not executable"


@pytest.mark.parametrize("args", [["train", "configs/demo.yaml", "train.steps=5"], ["config", "a b.yaml", "x='1 2'"]])
def test_entrypoint_runs_megajepa_with_the_arguments_unchanged(tmp_path, args):
    fake = tmp_path / "megajepa"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$0" "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    out = subprocess.run(["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, timeout=10, check=True)
    program, *received = out.stdout.decode().split("\0")[:-1]
    assert program == str(fake)
    assert received == args


def test_base_image_is_a_build_argument():
    keywords = [keyword for keyword, _ in instructions()]
    first_from = keywords.index("FROM")
    assert ("ARG", "BASE_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04") in instructions()[:first_from]
    assert instructions()[first_from] == ("FROM", "${BASE_IMAGE}")


def test_the_images_python_is_the_locks():
    """The lock's wheels are for its interpreter: Ubuntu 24.04's python3 is 3.12, the lock's."""
    wanted = re.search(r"Python (3\.\d+)", CUDA_LOCK.read_text().splitlines()[0]).group(1)
    named = set(re.findall(r"python(3\.\d+)", " ".join(text for _, text in instructions())))
    assert named <= {wanted}, f"the Dockerfile installs Python {named}, requirements/cuda.lock is for {wanted}"
    assert f"Python {wanted}" in DOCKERFILE.read_text().splitlines()[0]


@pytest.mark.parametrize("existing", [("ubuntu", "1000"), None])
def test_the_user_step_frees_uid_1000_first(tmp_path, existing):
    """The RUN that makes the image's user, run as written with user tools that log their calls:
    Ubuntu 24.04's `ubuntu` (uid and gid 1000) is removed before megajepa takes uid 1000."""
    step = next(text for keyword, text in instructions() if keyword == "RUN" and "useradd" in text)
    log = tmp_path / "calls"
    passwd = f"{existing[0]}:x:{existing[1]}:{existing[1]}::/home/{existing[0]}:/bin/bash" if existing else ""
    tools = {
        "getent": f'[ -n "{passwd}" ] && echo "{passwd}"',  # the user, and a group of the same name
        "userdel": f'echo "userdel $*" >> {log}',
        "groupdel": f'echo "groupdel $*" >> {log}',
        "useradd": f'echo "useradd $*" >> {log}',
    }
    for name, body in tools.items():
        (tmp_path / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    subprocess.run(["bash", "-o", "pipefail", "-c", step], env=env, check=True, timeout=10)
    changes = log.read_text().splitlines()
    removed = ["userdel --remove ubuntu", "groupdel ubuntu"] if existing else []
    assert changes == [*removed, "useradd --create-home --shell /bin/bash --uid 1000 --user-group megajepa"]


def test_the_build_context_leaves_out_the_venv_data_runs_and_history():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "data", "runs"} <= ignored
    assert not {source for source, _ in copies()} & ignored


def test_the_gpu_check_runs_in_the_image():
    """scripts/gpu_check.sh runs the GPU tests: both are in the image, beside the package."""
    copied = {source.rstrip("/") for source, _ in copies()}
    assert {"megajepa", "tests", "scripts", "configs"} <= copied


def test_rdma_userspace_for_nccl():
    apt = " ".join(text for keyword, text in instructions() if keyword == "RUN" and "apt-get install" in text)
    assert {"rdma-core", "libibverbs1", "ibverbs-providers", "librdmacm1"} <= set(apt.split())

